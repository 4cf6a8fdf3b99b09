"""Serialization and export of every module of _tables.MODULES and model of _tables.MODELS:
state_dict round trips torch.nn <-> pyseqk.nn both ways, torch.save/torch.load of whole modules
(weights_only=False) and of state_dicts (weights_only=True), and torch.export: the exported
program runs, matches eager, keeps the pyseqk ops as ops (not decomposed into a reference), and
survives torch.export.save/load."""
import io

import pytest
import torch

import pyseqk

from _tables import MODELS, MODULES, outputs


def pair(case):
    torch.manual_seed(0)
    t = case.torch_cls(**case.kwargs)
    torch.manual_seed(1)  # different weights, so a load that does nothing is caught
    p = case.pyseqk_cls(**case.kwargs)
    return t, p


def assert_same_outputs(a, b, args):
    with torch.no_grad():
        for x, y in zip(outputs(a(*args)), outputs(b(*args))):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def roundtrip(obj, weights_only):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


@pytest.mark.parametrize("case", MODULES, ids=lambda c: c.id)
def test_state_dict_both_ways(case):
    t, p = pair(case)
    args = case.make_input(t, 4)
    p.load_state_dict(t.state_dict(), strict=True)
    assert_same_outputs(t, p, args)
    torch.manual_seed(2)
    t2 = case.torch_cls(**case.kwargs)
    t2.load_state_dict(p.state_dict(), strict=True)
    assert_same_outputs(t2, p, args)
    assert list(t.state_dict()) == list(p.state_dict())


@pytest.mark.parametrize("case", MODULES, ids=lambda c: c.id)
def test_save_load_whole_module_and_state_dict(case):
    _, p = pair(case)
    args = case.make_input(p, 4)
    loaded = roundtrip(p, weights_only=False)
    assert type(loaded) is case.pyseqk_cls
    assert_same_outputs(p, loaded, args)
    state = roundtrip(p.state_dict(), weights_only=True)
    fresh = case.pyseqk_cls(**case.kwargs)
    fresh.load_state_dict(state, strict=True)
    assert_same_outputs(p, fresh, args)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.id)
def test_save_load_whole_model(model):
    torch.manual_seed(0)
    m = model.make()
    args = model.make_input(3)
    loaded = roundtrip(m, weights_only=False)
    assert_same_outputs(m, loaded, args)
    fresh = model.make()
    fresh.load_state_dict(roundtrip(m.state_dict(), weights_only=True))
    assert_same_outputs(m, fresh, args)


def test_converted_torch_model_saves_and_loads():
    """A torch.nn model swapped to pyseqk in place, saved whole, loads as pyseqk modules."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 5))
    m.add_module("cell", torch.nn.LSTMCell(5, 7))
    pyseqk.convert(m)
    loaded = roundtrip(m, weights_only=False)
    assert type(loaded.cell) is pyseqk.nn.LSTMCell
    x = torch.randn(2, 5)
    torch.testing.assert_close(loaded.cell(x)[0], m.cell(x)[0])


def pyseqk_ops_in(graph):
    return {str(n.target) for n in graph.nodes if n.op == "call_function" and "pyseqk" in str(n.target)}


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.id)
def test_torch_export(model):
    torch.manual_seed(0)
    m = model.make().eval()
    args = model.make_input(3)
    ep = torch.export.export(m, args)
    expected = {f"pyseqk.{name}.default" for name in model.ops}
    assert expected <= pyseqk_ops_in(ep.graph), ep.graph
    with torch.no_grad():
        eager = m(*args)
    torch.testing.assert_close(ep.module()(*args), eager)
    # Decomposing to the core ATen opset keeps custom ops whole.
    dec = ep.run_decompositions()
    assert expected <= pyseqk_ops_in(dec.graph)
    torch.testing.assert_close(dec.module()(*args), eager)
    # Other inputs of the same shape give the eager results too (no constant folding of inputs).
    other = model.make_input(3, gen=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ep.module()(*other), m(*other))
    # Saved and loaded (a .pt2 archive): the ops resolve by name again after load.
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    assert expected <= pyseqk_ops_in(loaded.graph)
    torch.testing.assert_close(loaded.module()(*args), eager)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.id)
def test_torch_export_dynamic_batch(model):
    torch.manual_seed(0)
    m = model.make().eval()
    args = model.make_input(3)
    batch = torch.export.Dim("batch", min=2, max=64)
    dynamic = tuple(None if d is None else {d: batch} for d in model.batch_dims)
    ep = torch.export.export(m, args, dynamic_shapes=dynamic)
    for b in (2, 5):
        other = model.make_input(b, gen=torch.Generator().manual_seed(b))
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(*other), m(*other))
