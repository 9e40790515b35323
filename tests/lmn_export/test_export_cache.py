"""The test session's ONNX export cache (tests/export_cache.py) hands a graph back only for the same inputs:
anything that can change the traced bytes changes the key."""

from __future__ import annotations

import pytest
import torch

import models.lmn
from lmn_export.graphs import example_state, step_graph, step_spec
from tests.export_cache import cached, export_key

from .conftest import tiny_model


def key(model, levels=None, opset=18, token=None):
    args = (torch.zeros(2, dtype=torch.int64) if token is None else token, *example_state(model, 2))
    return export_key(step_graph(model, levels=levels), args, step_spec(model.config), opset)


def test_the_key_follows_everything_the_graph_depends_on(monkeypatch):
    model = tiny_model()
    same = key(model)
    assert key(tiny_model()) == same  # the same weights, built again
    assert key(tiny_model(seed=1)) != same  # other weights
    assert key(tiny_model(n_bank=1)) != same  # another config
    assert key(model, levels=2) != same  # a fast path of the same model
    assert key(model, opset=19) != same
    assert key(model, token=torch.ones(2, dtype=torch.int64)) != same  # other example arguments
    assert key(model, token=torch.zeros(1, 2, dtype=torch.int64)) != same  # the same bytes in another shape
    monkeypatch.setattr(models.lmn, "FOLD_MAX_WEIGHTS", 0)  # a constant of the traced code
    assert key(model) != same
    monkeypatch.undo()
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: None)  # the exporter itself
    assert key(model) != same
    monkeypatch.undo()
    assert key(model) == same


def test_a_hit_writes_the_first_bytes_and_a_disabled_cache_exports(tmp_path):
    calls = []

    def exporter(graph, args, spec, path, opset):
        calls.append(path)
        path.write_bytes(f"graph {len(calls)}".encode())

    model = tiny_model()
    args = (torch.zeros(2, dtype=torch.int64), *example_state(model, 2))
    on = [True]
    export = cached(exporter, tmp_path / "cache", lambda: on[0])
    export(step_graph(model), args, step_spec(model.config), tmp_path / "a.onnx", 18)
    export(step_graph(model), args, step_spec(model.config), tmp_path / "b.onnx", 18)
    assert len(calls) == 1 and (tmp_path / "b.onnx").read_bytes() == b"graph 1"
    on[0] = False  # a test marked no_export_cache
    export(step_graph(model), args, step_spec(model.config), tmp_path / "c.onnx", 18)
    assert len(calls) == 2 and (tmp_path / "c.onnx").read_bytes() == b"graph 2"


@pytest.mark.no_export_cache
def test_the_marker_turns_the_session_cache_off():
    from tests import conftest

    assert conftest.EXPORT_CACHE_ON is False
