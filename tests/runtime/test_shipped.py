"""The shipped models: each packaged export is its shipped checkpoint, exported (the default, which
lmn-chat opens with no folder, and the small LogMem-32 the suite uses elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import runtime
from runtime.chat import main

SHIPPED = {"default": runtime.DEFAULT_EXPORT, "small": runtime.SMALL_EXPORT}
CHECKPOINTS = {"default": "DEFAULT_CHECKPOINT", "small": "SMALL_CHECKPOINT"}  # names in models.checkpoint
pytestmark = pytest.mark.skipif(not all((d / "lmn.json").is_file() for d in SHIPPED.values()), reason="no shipped export")


TOKENS = 640  # past 512 = 2^(max_levels - 1): the memory fills and the fast paths take over


def checkpoint_of(which: str):
    import models.checkpoint

    return getattr(models.checkpoint, CHECKPOINTS[which])


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def reference(request):
    """(which shipped model, PyTorch logits (TOKENS, V) of its checkpoint stepping the parity sample, the ids,
    the checkpoint's characters)."""
    torch = pytest.importorskip("torch")
    from lmn_export.parity_text import SAMPLE
    from models.checkpoint import load

    torch_model, vocab, _ = load(checkpoint_of(request.param))
    ids = vocab.encode((SAMPLE * 2)[: TOKENS + 1])
    state, out = torch_model.init_state(1), []
    with torch.no_grad():
        for token in ids[:-1]:
            logits, state = torch_model.step(torch.tensor([token]), state)
            out.append(logits[0].numpy())
    return request.param, np.stack(out), ids, "".join(vocab.chars)


def stream_logits(model, ids):
    stream, out = runtime.Stream(model), []
    for token in ids:
        stream.feed_ids([token])
        out.append(stream.logits.copy())
    return np.stack(out), stream


def test_shipped_export_matches_shipped_checkpoint(reference):
    from models.checkpoint import sha256

    which, want, ids, chars = reference
    model = runtime.load(SHIPPED[which])  # verifies every file hash against the manifest
    assert model.source_sha256 == sha256(checkpoint_of(which)), \
        f"re-export: lmn-export {checkpoint_of(which)} --out {SHIPPED[which]} --force"
    assert chars == model.vocab.chars
    got, stream = stream_logits(model, ids[:-1])
    gap = float(np.abs(got - want).max())
    # fp32 graphs vs PyTorch: ~2.5e-5 observed at export over 512 tokens; 1e-4 is the export's bound
    assert np.isfinite(got).all() and gap < 1e-4, gap
    calls = stream.graph_calls
    # from token 512 on, 15 of 16 steps run a fast path: the hand-over from a filling memory is covered
    assert {f"step_levels_{k}.onnx" for k in range(4)} <= set(calls), calls
    assert sum(n for f, n in calls.items() if f.startswith("step_levels_")) >= (TOKENS - 512) * 15 // 16 - 4


@pytest.mark.parametrize("precision", ["int8", "int4", "dynamic-int8"])
def test_shipped_quantized_graphs_stay_close_to_the_checkpoint(reference, precision):
    """Each quantized graph set is judged as the export judges it, by its gate (GATES: int8 98% and
    +0.01 nats, int4 and dynamic-int8 90% and +0.05), but against PyTorch and over 640 tokens (past
    the 512 where the memory fills and the fast paths take over); only that precision's step files run."""
    from lmn_export.quantize import GATES
    from runtime.manifest import precision_of

    which, want, ids, _ = reference
    if precision not in runtime.read_manifest(SHIPPED[which]).precisions("onnx"):
        pytest.skip(f"the shipped {which} export has no {precision} graphs")
    model = runtime.load(SHIPPED[which], precision=precision)
    got, stream = stream_logits(model, ids[:-1])
    assert np.isfinite(got).all()
    own = {g["file"] for g in model.manifest.graphs("onnx") if g["name"] in ("step", "step_levels")
           and precision_of(g) == precision}  # chosen from the manifest's fields, as the runtime chooses
    assert set(stream.graph_calls) <= own, stream.graph_calls
    assert {model.step_graph["file"], model.fast_path_graphs[0]["file"]} <= set(stream.graph_calls)

    def loss(logits):
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return float(-logp[np.arange(len(logits)), ids[1:]].mean())

    gate = GATES[precision]
    agreement, increase = float((want.argmax(-1) == got.argmax(-1)).mean()), loss(got) - loss(want)
    assert agreement >= gate.min_agreement and increase <= gate.max_loss_increase, (agreement, increase)
    assert float(np.abs(got - want).max()) > 1e-4  # it really ran quantized graphs


def test_chat_runs_the_default_with_no_folder():
    result = CliRunner().invoke(main, ["--prompt", "ROMEO:\n", "--max-tokens", "60", "--seed", "1"])
    assert result.exit_code == 0, result.output
    reply = result.output.removesuffix("\n")  # lmn-chat ends the reply with a newline
    # 60 characters, or fewer that end at the default stop string "\n\n"
    assert len(reply) == 60 or 0 < len(reply) < 60 and reply.endswith("\n\n"), result.output
    assert runtime.load().directory == runtime.DEFAULT_EXPORT
