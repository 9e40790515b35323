"""The text streamed through PyTorch and the exported graphs for parity checks."""

from __future__ import annotations

from pathlib import Path

import torch

from models.data import DataError, Vocab, load_text

# Hamlet, Act 3, Scene 1 (public domain): real text in the style of the reference corpus.
SAMPLE = """HAMLET:
To be, or not to be: that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles,
And by opposing end them? To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life;
For who would bear the whips and scorns of time,
The oppressor's wrong, the proud man's contumely,
The pangs of despised love, the law's delay,
The insolence of office and the spurns
That patient merit of the unworthy takes,
When he himself might his quietus make
With a bare bodkin?
"""


@torch.no_grad()
def sampled_ids(model, count: int, seed: int = 0) -> list[int]:
    """Text the model writes itself (seeded sampling), for vocabularies the sample does not fit."""
    generator = torch.Generator().manual_seed(seed)
    state = model.init_state(1)
    token = torch.zeros(1, dtype=torch.int64)
    ids = []
    for _ in range(count):
        logits, state = model.step(token, state)
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
        ids.append(int(token))
    return ids


def parity_ids(model, vocab: Vocab, count: int, source: str | None = None) -> tuple[list[int], str]:
    """(token ids, where they came from): --text if given, else the Hamlet sample if the
    vocabulary encodes it (a byte vocabulary encodes any text), else text sampled from the model."""
    if source is not None:
        text = load_text(source)
        try:
            return vocab.encode(text), f"file {Path(source).name}"
        except DataError as e:
            raise DataError(f"--text {source}: {e}") from None
    try:
        return vocab.encode(SAMPLE), "Hamlet 3.1 sample (built in)"
    except DataError:  # a character vocabulary without some of the sample's characters
        return sampled_ids(model, count), "sampled from the model (vocabulary lacks the built-in sample's characters)"
