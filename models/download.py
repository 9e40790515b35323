"""Downloading a corpus: the one way `lmn-prepare` and `lmn-train --data URL` fetch an http(s) URL.

The bytes are streamed to a temp file beside the destination and renamed into place only when they
are whole: as many as the server's Content-Length promised, and (where the corpus is known, see
KNOWN_SHA256) the right sha256. A timeout, a dropped connection, a short body or a 5xx answer is
retried (RETRIES tries, BACKOFF_S doubling between them); a 4xx answer is not. Every failure is a
one-line DataError naming the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from runtime.atomic import atomic_path

from .data import DataError

CHUNK = 1 << 20
TIMEOUT_S = 30.0
RETRIES = 3
BACKOFF_S = 0.5  # before the 2nd try; doubled before each further one
PROGRESS_MIN_BYTES = 32 << 20  # smaller downloads take well under a second: no progress bar
KNOWN_SHA256 = {  # corpora whose content is fixed: a different one is a broken download, not new data
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt":
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
}


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class _Retry(Exception):
    """A failure another try may not have (a timeout, a dropped connection, a short body, a 5xx)."""


@contextlib.contextmanager
def progress(length: int, label: str, show: bool) -> Iterator[Any]:
    """A progress bar over `length` bytes, on stderr for PROGRESS_MIN_BYTES or more (when `show`)."""
    visible = show and length >= PROGRESS_MIN_BYTES
    with open(os.devnull, "w") as devnull, click.progressbar(
            length=max(length, 1), label=label, file=sys.stderr if visible else devnull) as bar:
        yield bar


def download(url: str, path: Path, show: bool = False, sha256: str | None = None) -> None:
    """Fetch `url` into `path` (written atomically: whole, or not at all). `sha256` defaults to KNOWN_SHA256's."""
    sha256 = sha256 or KNOWN_SHA256.get(url)
    for attempt in range(RETRIES):
        try:
            with atomic_path(path) as tmp:
                _fetch(url, tmp, show, sha256)
            return
        except _Retry as e:
            if attempt + 1 == RETRIES:
                raise DataError(f"cannot download {url}: {e} (tried {RETRIES} times); check the network and the URL, "
                                "or pass a local file") from None
            time.sleep(BACKOFF_S * 2**attempt)


def _fetch(url: str, tmp: Path, show: bool, sha256: str | None) -> None:
    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as f:
            promised = response.headers.get("Content-Length")
            expected = int(promised) if promised and promised.isdigit() else None
            with progress(expected or 0, f"downloading {url}", show) as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if e.code >= 500:
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        raise DataError(f"cannot download {url}: HTTP {e.code} {e.reason}; check the URL") from None
    except http.client.IncompleteRead as e:
        raise _Retry(f"the server closed the connection after {received + len(e.partial):,} bytes") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as e:
        raise _Retry(str(getattr(e, "reason", e) or type(e).__name__)) from None
    except ValueError as e:  # a malformed URL
        raise DataError(f"cannot download {url}: {e}; check the URL") from None
    if expected is not None and received != expected:
        raise _Retry(f"received {received:,} of the {expected:,} bytes the server announced")
    if sha256 is not None and digest.hexdigest() != sha256:
        raise _Retry(f"the content's sha256 is {digest.hexdigest()}, expected {sha256}")
