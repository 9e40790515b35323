"""`lmn-chat`: a streaming REPL over an export folder (the shipped default when none is given)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .backends import BackendError
from .manifest import ManifestError
from .model import PRECISIONS, load
from .reader import excerpt
from .sampling import check_sampling
from .state_file import StateFileError
from .stream import ContextFullError, Stream, check_stop
from .vocab import UnknownCharacterError

HELP = """commands:
  /reset        forget the conversation (empty state)
  /save PATH    save the state (a few KB, whatever the length)
  /load PATH    load a saved state
  /stats        tokens seen, state bytes, decode speed
  /temp X       sampling temperature (0 = greedy)
  /help         this text
Ctrl-C stops a reply and keeps the session; Ctrl-D exits."""


class Chat:
    def __init__(self, stream: Stream, max_tokens: int, temperature: float, top_k, top_p, seed,
                 stop=("\n\n",), out=sys.stdout):
        self.stream = stream
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_k, self.top_p = top_k, top_p
        self.seed = seed
        self.stop = check_stop(stop)
        self.turn = 0
        self.out = out

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name == "/reset":
                self.stream.reset()
                self.say("[state reset]")
            elif name == "/save" and arg:
                size = self.stream.save(arg)
                self.say(f"[saved {self.stream.tokens_seen} tokens of context in {size:,} bytes to {arg}]")
            elif name == "/load" and arg:
                self.stream.load(arg)
                self.say(f"[loaded {arg}: {self.stream.tokens_seen} tokens of context]")
            elif name == "/stats":
                s = self.stream
                self.say(f"[tokens seen {s.tokens_seen:,} | state {s.state_bytes:,} bytes | "
                         f"decode {s.tokens_per_second:,.0f} tokens/s]")
            elif name == "/temp" and arg:
                try:
                    value = float(arg)
                except ValueError:
                    raise ValueError(f"/temp takes a number, got {excerpt(arg)}") from None
                check_sampling(value, self.top_k, self.top_p, self.seed)
                self.temperature = value
                self.say(f"[temperature {value:g}]")
            elif name == "/help":
                self.say(HELP)
            else:
                self.say(f"[unknown command {excerpt(line)}; /help lists them]")
        except (StateFileError, OSError, ValueError) as e:
            self.say(f"[error: {e}]")

    def reply(self, text: str) -> None:
        """Feed the user's text and stream the continuation; Ctrl-C ends it early, keeping the session."""
        before = self.stream.tokens_seen
        try:
            self.stream.feed(text)
        except (UnknownCharacterError, ContextFullError) as e:
            self.say(f"[error: {e}]")
            return
        except KeyboardInterrupt:
            fed = self.stream.tokens_seen - before  # tokens: characters, or bytes for a byte vocabulary
            self.say(f"\n[stopped while reading your text: {fed} of {len(self.stream.model.vocab.encode(text))} "
                     "tokens were fed]")
            return
        seed = None if self.seed is None else self.seed + self.turn
        self.turn += 1
        try:
            for char in self.stream.generate(self.max_tokens, self.temperature, self.top_k, self.top_p, seed,
                                             stop=self.stop):
                self.out.write(char)
                self.out.flush()
        except KeyboardInterrupt:
            self.out.write("\n[stopped]")
        except ContextFullError as e:
            self.out.write(f"\n[error: {e}]")
        self.out.write("\n")
        self.out.flush()

    def repl(self) -> None:
        self.say("lmn-chat: type text and the model continues it. /help for commands, Ctrl-D to exit.")
        while True:
            try:
                line = input("> ")
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:
                self.say("")
                continue
            try:
                if line.startswith("/"):
                    self.command(line.strip())
                elif line:
                    self.reply(line + "\n")
            except KeyboardInterrupt:  # between a reply's parts: the session goes on
                self.say("\n[stopped]")


@click.command()
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Continue this text and exit (non-interactive).")
@click.option("--max-tokens", type=click.IntRange(min=0, max=10**9), default=300, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=1, max=2**31 - 1), default=None, help="Sample from the k likeliest tokens (k >= 1).")
@click.option("--top-p", type=float, default=None, help="Sample from the smallest set with this mass, in (0, 1].")
@click.option("--seed", type=click.IntRange(min=0, max=2**64 - 1), default=None, help="Seed for reproducible sampling.")
@click.option("--stop", multiple=True, default=["\n\n"], show_default=True,
              help="End a reply after this text (repeatable; '' for none).")
@click.option("--threads", type=click.IntRange(min=1, max=1024), default=1, show_default=True, help="onnxruntime intra-op threads.")
@click.option("--backend", type=click.Choice(["onnxruntime", "coreml"]), default="onnxruntime", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Which of the export's ONNX graph sets to run (int8, int4, dynamic-int8: an export made with "
                   "lmn-export --quantize naming it).")
@click.option("--unknown", type=click.Choice(["error", "skip"]), default="error", show_default=True,
              help="What to do with characters the model does not know.")
@click.option("--json", "as_json", is_flag=True, help="Non-interactive: print a JSON object instead of text.")
def main(directory, prompt, max_tokens, temperature, top_k, top_p, seed, stop, threads, backend, precision, unknown,
         as_json):
    """Chat with an exported LMN (DIRECTORY, default: the shipped model), streaming each character."""
    try:
        check_sampling(temperature, top_k, top_p, seed)
        model = load(directory, threads=threads, backend=backend, unknown=unknown, precision=precision)
    except (ManifestError, BackendError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    stream = Stream(model)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is None:
        try:
            Chat(stream, max_tokens, temperature, top_k, top_p, seed, stop).repl()
        except OSError as e:  # the terminal went away or stdout is on a full device
            raise click.ClickException(f"cannot write to the terminal: {e.strerror or e}") from None
        return
    try:
        stream.feed(prompt)
        chars = stream.generate(max_tokens, temperature, top_k, top_p, seed, stop=check_stop(stop))
        if as_json:
            text = "".join(chars)
            click.echo(json.dumps({"prompt": prompt, "continuation": text, "tokens_seen": stream.tokens_seen,
                                   "state_bytes": stream.state_bytes, "tokens_per_second": stream.tokens_per_second}))
            return
        for char in chars:
            sys.stdout.write(char)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except (UnknownCharacterError, ContextFullError) as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # stdout on a full device or a closed pipe
        raise click.ClickException(f"cannot write the reply: {e.strerror or e}") from None


if __name__ == "__main__":
    main()
