"""Parallel mode and sequential mode compute the same thing (the product's core promise)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import PRESETS, LMN, LMNConfig, StepState

# fp32 rounding: both modes run the same ops on the same operands, but batched matmuls may
# reduce in a different order; observed differences are ~1e-6 after four layers.
ATOL = 1e-5

TINY = LMNConfig(vocab_size=11, n_embd=16, n_head=2, n_layer=2, n_bank=2, max_levels=6)
VARIANTS = {
    f"{s}-bank{b}-expand{e}": dataclasses.replace(TINY, summarizer=s, n_bank=b, expand=e)
    for s in ("linear", "conv", "dwsep") for b in (1, 2) for e in (0, 2)
}
# logmem-512 (a benchmark preset) is left out: it is logmem-128's code at 4x the width, so it adds
# no path these tests do not cover, and stepping 1,024 tokens at E=512 would take minutes of CI.
LMN_PRESETS = {name: cfg for name, cfg in PRESETS.items() if isinstance(cfg, LMNConfig) and name != "logmem-512"}
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


def summary_levels(pointer: int, max_levels: int) -> int:
    """The test's own integer arithmetic: a step at `pointer` re-summarizes levels 1..k, k = the
    trailing zero bits of pointer + 1, capped at max_levels - 1."""
    n = pointer + 1
    return min((n & -n).bit_length() - 1, max_levels - 1)


def assert_crosses(start: int, steps: int, boundary: int) -> None:
    """A stream of `steps` tokens from `start` steps at boundary - 1 (t+1 = boundary: every level
    re-summarizes), at boundary and at boundary + 1 (which float32 cannot tell apart)."""
    assert start <= boundary - 1 and boundary + 1 <= start + steps - 1, (start, steps, boundary)


# Rows at different pointers in one batch. Row 0 fills its memory from empty (level i completes at
# pointer 2^i - 1: slots unmask one level at a time, levels 1..5 re-summarize); row 1 re-summarizes
# every level at pointer 2^24 - 1 (step 4; all 9 summary levels of a max_levels 10 preset) and goes
# on past 2^24, where float32 stops counting; row 2 re-summarizes every level at 2^31 - 1 (step 44)
# and crosses the int32 limit. At step 4 the rows re-summarize 0, every, and 3 levels.
MIXED_STARTS = (0, 2**24 - 5, 2**31 - 45)
MIXED_STEPS = 64


@torch.no_grad()
def assert_rows_step_alone(model: LMN, starts=MIXED_STARTS, steps: int = MIXED_STEPS) -> None:
    """Each row of a batch whose rows sit at different pointers steps exactly as it does alone.

    The batch step must select, per row, which levels take their new summary (the general path:
    the rows re-summarize different level counts), while a row alone re-summarizes exactly its own
    levels (the exact path). Beyond the comparison with each row alone, at every step a row keeps
    its levels above k (k from its own pointer) bit for bit in every layer and replaces levels 1..k
    in the last layer (not checked in layer 0, where a repeated token pair can give the same node).
    """
    cfg = model.config
    top = cfg.max_levels - 1
    assert_crosses(starts[1], steps, 2**24)
    assert_crosses(starts[2], steps, 2**31)
    counts = [[summary_levels(p + t, cfg.max_levels) for p in starts] for t in range(steps)]
    assert any(len(set(c)) == len(starts) for c in counts), "no step where every row re-summarizes a different count"
    for level in range(1, top + 1):  # the per-row choice decides every level at some step
        assert any(min(c) < level <= max(c) for c in counts), f"level {level} never re-summarized by only some rows"

    generator = torch.Generator().manual_seed(len(starts) * steps)
    tokens = torch.randint(cfg.vocab_size, (len(starts), steps), generator=generator)
    # Any memory is a state the step must carry forward row by row; a row at pointer 0 is empty.
    memory = torch.randn(len(starts), cfg.n_layer, cfg.n_slots, cfg.n_embd, generator=generator)
    memory[[b for b, p in enumerate(starts) if p == 0]] = 0
    batch = StepState(memory.clone(), torch.tensor(starts))
    alone = [StepState(memory[b : b + 1].clone(), torch.tensor([p])) for b, p in enumerate(starts)]
    for t in range(steps):
        before = batch.memory
        logits, batch = model.step(tokens[:, t], batch)
        changed = (batch.memory != before).any(-1)[:, :, 1:]  # (B, N, S-1): summary slots
        for b in range(len(starts)):
            k = counts[t][b]
            want = [level <= k for level in range(1, top + 1) for _ in range(cfg.n_bank)]
            assert not changed[b, :, k * cfg.n_bank :].any(), (t, starts[b] + t, k)  # kept bit for bit
            assert changed[b, -1].tolist() == want, (t, starts[b] + t, k)
            row_logits, alone[b] = model.step(tokens[b : b + 1, t], alone[b])
            torch.testing.assert_close(logits[b], row_logits[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(batch.memory[b], alone[b].memory[0], atol=ATOL, rtol=0)
    assert batch.pointer.tolist() == [p + steps for p in starts]
    assert [s.pointer.item() for s in alone] == batch.pointer.tolist()


# A batch of rows and a row alone take different kernels (batch-3 vs batch-1 matmuls, all levels
# computed then selected vs only the row's own levels): observed gaps are <= 2e-6 over these
# 64-token streams; a row that keeps or takes the wrong level moves its memory by ~1.
@pytest.mark.parametrize("name", VARIANTS)
def test_mixed_pointer_rows_step_like_each_row_alone(name):
    assert_rows_step_alone(make(VARIANTS[name]))


@pytest.mark.parametrize("name", LMN_PRESETS)
def test_presets_mixed_pointer_rows_step_like_each_row_alone(name):
    """max_levels 10: only rows 1 and 2 re-summarize levels 6..9 (at 2^24 - 1 and 2^31 - 1); row 0
    fills levels 1..5 only."""
    assert_rows_step_alone(make(LMN_PRESETS[name]))


def test_exact_level_steps_equal_the_general_step():
    """A step told how many levels every row re-summarizes (the exported fast paths) computes what
    the general step computes: here the general step is one batch of rows at pointers that
    re-summarize 0..5 levels (so it selects levels per row), and each exact step is one row alone
    with levels=k, full=True (only its k summaries computed, no slot masked). A wrong promise is
    refused in eager mode, not silently obeyed."""
    model = make(VARIANTS["conv-bank2-expand2"])
    pointers = [40, 41, 43, 39, 47, 63, 2**31 - 1]  # every row full: pointer + 1 >= 2^5
    levels = [summary_levels(p, 6) for p in pointers]
    assert levels == [0, 1, 2, 3, 4, 5, 5]
    memory = torch.randn(len(pointers), 2, model.config.n_slots, 16, generator=torch.Generator().manual_seed(0))
    tokens = torch.arange(len(pointers)) % 11
    with torch.no_grad():
        want_logits, want = model.step(tokens, StepState(memory, torch.tensor(pointers)))
        for b, (pointer, k) in enumerate(zip(pointers, levels)):
            row = StepState(memory[b : b + 1].clone(), torch.tensor([pointer]))
            got_logits, got = model.step(tokens[b : b + 1], row, levels=k, full=True)
            torch.testing.assert_close(got_logits[0], want_logits[b], atol=ATOL, rtol=0)
            torch.testing.assert_close(got.memory[0], want.memory[b], atol=ATOL, rtol=0)
        state = StepState(memory[:1].clone(), torch.tensor([41]))
        with pytest.raises(ValueError, match="re-summarize"):
            model.step(torch.tensor([3]), state, levels=0)
        state.pointer = torch.tensor([30])  # 31 tokens seen: level 5 (32 tokens) still empty
        with pytest.raises(ValueError, match="full=True"):
            model.step(torch.tensor([3]), state, levels=0, full=True)
        with pytest.raises(ValueError, match="levels must be in"):
            model.step(torch.tensor([3]), state, levels=6)


def test_exact_zero_level_step_at_a_resummarizing_pointer_is_wrong():
    """Negative control: the 0-level fast path (traced, so its promise is not checked, as in an
    export) run at pointer 63, where 5 levels re-summarize, leaves every summary stale: each summary
    slot of every layer differs from what the step computes there, while layer 0's level-0 node
    (the token's own) agrees. So the agreement above is not vacuous."""
    import warnings

    from lmn_export.graphs import step_graph

    model = make(VARIANTS["conv-bank2-expand2"])
    memory = torch.randn(1, 2, model.config.n_slots, 16, generator=torch.Generator().manual_seed(0))
    example = (torch.tensor([3]), memory, torch.tensor([40]))  # a pointer where 0 levels is right
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python-side checks skipped when tracing
        fast0 = torch.jit.trace(step_graph(model, levels=0, full=True), example)
        got = fast0(torch.tensor([3]), memory, torch.tensor([63]))
        _, want = model.step(torch.tensor([3]), StepState(memory, torch.tensor([63])))
    gap = (got[1] - want.memory).abs().amax(-1)[0]  # (N, S)
    assert gap[0, 0] <= ATOL  # layer 0's level 0 (the token's own node) is computed either way
    assert (gap[:, 1:] > 1e-3).all(), gap  # levels 1..5 (2 banks each): stale in the 0-level step


# Parallel mode from any state. Start pointers: pointer 0, unaligned, just below 2^k boundaries (every
# level re-summarizes at the next token), past 2^24 (where float32 loses integers) and 2^31 (int32),
# and near the int64 limit; one batch holds them all, so rows at different pointers are covered too.
STARTS = (0, 37, 31, 63, 2**24 - 3, 2**31 - 2, 2**62 + 5, 2**63 - 1 - 80)


def random_state(model: LMN, pointers, seed: int = 0) -> StepState:
    """A state at `pointers` with random nodes: the modes must agree from any state, not only reachable ones."""
    cfg = model.config
    memory = torch.randn(len(pointers), cfg.n_layer, cfg.n_slots, cfg.n_embd, generator=torch.Generator().manual_seed(seed))
    return StepState(memory, torch.tensor(pointers, dtype=torch.int64))


def assert_forward_from_state_agrees(model: LMN, T: int, starts=STARTS) -> None:
    state = random_state(model, starts)
    tokens = torch.randint(model.config.vocab_size, (len(starts), T), generator=torch.Generator().manual_seed(T))
    stepped, final = run_steps(model, tokens, state)
    lengths = torch.tensor([T - (b % 3) * (T // 3) for b in range(len(starts))])  # rows of their own lengths too
    with torch.no_grad():
        parallel, after = model(tokens, return_state=True, state=state)
        _, partial = model(tokens, return_state=True, state=state, lengths=lengths)
    torch.testing.assert_close(parallel, stepped, atol=ATOL, rtol=0)
    torch.testing.assert_close(after.memory, final.memory, atol=ATOL, rtol=0)
    assert torch.equal(after.pointer, final.pointer)
    for b, length in enumerate(lengths.tolist()):
        _, alone = run_steps(model, tokens[b : b + 1, :length], StepState(state.memory[b : b + 1], state.pointer[b : b + 1]))
        torch.testing.assert_close(partial.memory[b : b + 1], alone.memory, atol=ATOL, rtol=0)
        assert partial.pointer[b] == alone.pointer[0]


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_agree_from_any_state(name):
    assert_forward_from_state_agrees(make(VARIANTS[name]), T=70)


@pytest.mark.parametrize("name", LMN_PRESETS)
def test_presets_agree_from_any_state(name):
    assert_forward_from_state_agrees(make(LMN_PRESETS[name]), T=40)


def test_from_state_far_beyond_top_level_and_in_pieces():
    """A long stream fed as consecutive windows, each from the state the last one left, is the stream
    stepped whole (windows longer than the top level's block, at odd lengths)."""
    model = make(dataclasses.replace(TINY, max_levels=5))
    tokens = torch.randint(11, (2, 301), generator=torch.Generator().manual_seed(3))
    stepped, final = run_steps(model, tokens)
    state, outs = model.init_state(2), []
    with torch.no_grad():
        for a, b in ((0, 1), (1, 40), (40, 41), (41, 200), (200, 301)):
            logits, state = model(tokens[:, a:b], return_state=True, state=state)
            outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, dim=1), stepped, atol=ATOL, rtol=0)
    torch.testing.assert_close(state.memory, final.memory, atol=ATOL, rtol=0)


def test_from_state_negative_control():
    """A wrong starting state (pointer off by one, or one node changed) must fail the comparison."""
    model = make(TINY)
    state = random_state(model, [37, 2**24 - 3])
    tokens = torch.randint(11, (2, 40), generator=torch.Generator().manual_seed(4))
    stepped, _ = run_steps(model, tokens, state)
    wrong_pointer = StepState(state.memory, state.pointer + 1)
    wrong_node = StepState(state.memory.clone(), state.pointer)
    wrong_node.memory[:, 1, 3] += 0.5  # layer 1, level 2 bank 0: a level every start pointer here has filled
    with torch.no_grad():
        for wrong in (wrong_pointer, wrong_node):
            gap = (model(tokens, state=wrong) - stepped).abs().max().item()
            assert gap > 100 * ATOL, f"a wrong starting state moved logits by only {gap}"


def test_gradients_flow_into_the_starting_state():
    """A caller may train through the starting state, or detach it to stop the gradient."""
    model = make(VARIANTS["conv-bank2-expand2"])
    state = random_state(model, [5, 300])
    state.memory.requires_grad_(True)
    tokens = torch.randint(11, (2, 20), generator=torch.Generator().manual_seed(5))
    model(tokens, state=state).logsumexp(-1).mean().backward()
    grad = state.memory.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad[:, :, 0].abs().sum() > 0 and grad[:, :, 1:].abs().sum() > 0  # level 0 and the summaries
    detached = StepState(state.memory.detach(), state.pointer)
    model.zero_grad()
    model(tokens, state=detached).logsumexp(-1).mean().backward()
    assert detached.memory.grad is None


@pytest.mark.parametrize("change, message", [
    (lambda s: StepState(s.memory[:1], s.pointer), "memory must be"),  # batch size
    (lambda s: StepState(s.memory[:, :, :-1], s.pointer), "memory must be"),  # shape
    (lambda s: StepState(s.memory.double(), s.pointer), "memory must be"),  # dtype
    (lambda s: StepState(s.memory, s.pointer.int()), "pointer must be int64"),
    (lambda s: StepState(s.memory, s.pointer[:1]), "pointer must be int64"),
    (lambda s: StepState(s.memory, torch.tensor([3, -1])), "starting pointers must be in"),
    (lambda s: StepState(s.memory, torch.tensor([3, 2**63 - 1 - 9])), "starting pointers must be in"),
])
def test_bad_starting_state_is_one_line_error(change, message):
    model = make(TINY)
    state = random_state(model, [3, 4])
    bad = change(state)
    before = (bad.memory.clone(), bad.pointer.clone())
    with pytest.raises(ValueError, match=message) as error:
        model(torch.zeros(2, 10, dtype=torch.int64), state=bad)
    assert "\n" not in str(error.value)
    assert torch.equal(bad.memory, before[0]) and torch.equal(bad.pointer, before[1])  # nothing changed
