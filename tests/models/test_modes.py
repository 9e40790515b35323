"""Parallel mode and sequential mode compute the same thing (the product's core promise)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import PRESETS, LMN, LMNConfig

# fp32 rounding: both modes run the same ops on the same operands, but batched matmuls may
# reduce in a different order; observed differences are ~1e-6 after four layers.
ATOL = 1e-5

TINY = LMNConfig(vocab_size=11, n_embd=16, n_head=2, n_layer=2, n_bank=2, max_levels=6)
VARIANTS = {
    f"{s}-bank{b}-expand{e}": dataclasses.replace(TINY, summarizer=s, n_bank=b, expand=e)
    for s in ("linear", "conv", "dwsep") for b in (1, 2) for e in (0, 2)
}
LMN_PRESETS = {name: cfg for name, cfg in PRESETS.items() if isinstance(cfg, LMNConfig)}
LENGTHS = (1, 7, 64, 300, 1024)


def make(cfg: LMNConfig, seed: int = 0) -> LMN:
    torch.manual_seed(seed)
    return LMN(cfg).eval()


@torch.no_grad()
def run_steps(model: LMN, tokens: torch.Tensor, state=None):
    """Sequential mode over tokens (B, T) -> logits (B, T, V), final state."""
    state = state if state is not None else model.init_state(tokens.shape[0])
    outs = []
    for t in range(tokens.shape[1]):
        logits, state = model.step(tokens[:, t], state)
        outs.append(logits)
    return torch.stack(outs, dim=1), state


def assert_modes_agree(model: LMN, T: int, batch: int = 2) -> None:
    tokens = torch.randint(model.config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(T))
    stepped, final = run_steps(model, tokens)
    with torch.no_grad():
        for length in sorted({n for n in LENGTHS if n <= T} | {T}):
            parallel, state = model(tokens[:, :length], return_state=True)
            torch.testing.assert_close(parallel, stepped[:, :length], atol=ATOL, rtol=0)
    torch.testing.assert_close(state.memory, final.memory, atol=ATOL, rtol=0)
    assert torch.equal(state.pointer, final.pointer)


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_agree(name):
    assert_modes_agree(make(VARIANTS[name]), T=1024)


@pytest.mark.parametrize("name", LMN_PRESETS)
def test_presets_agree(name):
    assert_modes_agree(make(LMN_PRESETS[name]), T=300 if "128" in name else 1024)


@pytest.mark.parametrize("name", ["linear-bank2-expand0", "dwsep-bank1-expand2"])
def test_rows_at_different_pointers(name):
    """A batch whose rows sit at their own positions steps exactly like each row alone."""
    model = make(VARIANTS[name])
    prefixes, follow = (0, 5, 37), 40
    rows = [torch.randint(11, (1, p + follow), generator=torch.Generator().manual_seed(p)) for p in prefixes]
    states = [model(r[:, :p], return_state=True)[1] if p else model.init_state(1) for r, p in zip(rows, prefixes)]
    memory = torch.cat([s.memory for s in states])
    pointer = torch.cat([s.pointer for s in states])
    assert pointer.tolist() == list(prefixes)
    batch = torch.cat([r[:, p:] for r, p in zip(rows, prefixes)])
    stepped, _ = run_steps(model, batch, type(states[0])(memory, pointer))
    with torch.no_grad():
        for b, (r, p) in enumerate(zip(rows, prefixes)):
            torch.testing.assert_close(stepped[b], model(r)[0, p:], atol=ATOL, rtol=0)


def test_negative_control_other_weights_disagree():
    """The parity check must catch a model that is not the same one."""
    model, other = make(TINY, seed=0), make(TINY, seed=0)
    with torch.no_grad():
        other.blocks[1].memory.summarize.weight.mul_(1.01)
    tokens = torch.randint(11, (2, 64), generator=torch.Generator().manual_seed(1))
    stepped, _ = run_steps(other, tokens)
    with torch.no_grad():
        gap = (model(tokens) - stepped).abs().max().item()
    assert gap > 100 * ATOL, f"a 1% change in one summarizer moved logits by only {gap}"


def test_causality():
    """Changing tokens after position t never changes outputs at or before t."""
    model = make(VARIANTS["conv-bank2-expand2"])
    tokens = torch.randint(11, (2, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model(tokens)
        for t in (0, 1, 63, 64, 150):
            changed = tokens.clone()
            changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 11
            after = model(changed)
            torch.testing.assert_close(after[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
            assert (after[:, t + 1 :] - base[:, t + 1 :]).abs().max() > 1e-3


def test_modes_agree_far_beyond_top_level():
    """Parallel mode caps levels like the step does, so they agree for T >> 2^(max_levels-1)."""
    model = make(dataclasses.replace(TINY, max_levels=5))
    assert_modes_agree(model, T=2000, batch=1)


@pytest.mark.parametrize("layout", ["rows", "concat"])
def test_gpt_cache_layouts_agree(layout):
    """The benchmark's in-place-rows and concat KV layouts compute the same logits as the full-cache step."""
    from models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, n_embd=16, n_head=2, n_layer=2, block_size=40)).eval()
    tokens = torch.randint(11, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parallel = model(tokens)
        state = model.init_state(2)
        keys = state.keys[:, :, :, :0] if layout == "concat" else state.keys.clone()
        values = keys.clone()
        for t in range(40):
            pointer = torch.full((2,), t)
            logits, k, v = model.step_layout(tokens[:, t], keys, values, pointer, layout)
            if layout == "concat":
                keys, values = k, v
            else:
                keys[:, :, :, t], values[:, :, :, t] = k, v  # the caller's in-place row write
            torch.testing.assert_close(logits, parallel[:, t], atol=ATOL, rtol=0)


@pytest.mark.parametrize("fold", [True, False])
def test_step_attention_folded_and_factored(fold, monkeypatch):
    """The step reads raw slots through projections multiplied together (small models) or kept as
    per-head factors (large ones); both are the parallel pass's attention, reassociated."""
    import models.lmn

    monkeypatch.setattr(models.lmn, "FOLD_MAX_WEIGHTS", 1 << 30 if fold else 0)
    assert_modes_agree(make(dataclasses.replace(TINY, n_head=4)), 70)


def test_exact_level_steps_equal_the_general_step():
    """A step told how many levels every row re-summarizes (the exported fast paths) computes what
    the general step computes; a wrong promise is refused in eager mode, not silently obeyed."""
    model = make(VARIANTS["conv-bank2-expand2"])
    state = model.init_state(1)
    state.memory.normal_(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for pointer, levels in ((40, 0), (41, 1), (47, 4), (63, 5), (2**31 - 1, 5)):
            state.pointer = torch.tensor([pointer])
            want = model.step(torch.tensor([3]), state)
            got = model.step(torch.tensor([3]), state, levels=levels, full=True)
            torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(got[1].memory, want[1].memory, atol=ATOL, rtol=0)
        state.pointer = torch.tensor([41])
        with pytest.raises(ValueError, match="re-summarize"):
            model.step(torch.tensor([3]), state, levels=0)
        state.pointer = torch.tensor([30])  # 31 tokens seen: level 5 (32 tokens) still empty
        with pytest.raises(ValueError, match="full=True"):
            model.step(torch.tensor([3]), state, levels=0, full=True)
        with pytest.raises(ValueError, match="levels must be in"):
            model.step(torch.tensor([3]), state, levels=6)
