"""ONNX export, the graphs: the step graph's parity with torch over every core and input kind,
the graph contract, and the Scan sequence graph at lengths other than the example's. Every
model is small and random; graphs run on onnxruntime's CPU provider. The folder, meta.json and
the runtime are tests/test_export.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from export_models import TEXT, TOL, H, make_model

from training.data.tokenizer import train_char_tokenizer
from training.export import (
    IR_VERSION,
    OPSET,
    _cpu_session,
    _example_inputs,
    check_parity,
    sequence_graph,
    step_graph,
)
from training.models import pack_state, state_slots, unpack_state


@pytest.fixture(scope="module")
def tok():
    return train_char_tokenizer([TEXT])


# The parity matrix: every core the exporter supports, char and glimpse models.
CORES = {
    "nlstm-d2": dict(core="nlstm", depth=2),
    "nlstm-d3": dict(core="nlstm", depth=3),
    "nlstm-d2x2": dict(core="nlstm", depth=2, num_layers=2),
    "lstm": dict(core="lstm", num_layers=1),
    "lstm-stacked": dict(core="lstm", num_layers=2),
    "hmlstm": dict(core="hmlstm", num_layers=3),
}
CASES = [(name, kind) for name in CORES for kind in ("char", "glimpse")]


@pytest.fixture(scope="module")
def graphs(tok):
    """Step graphs exported once per case (1-3 s of CPU time each: 0.7 s for an LSTM, 2.7 s for
    an HM-LSTM, measured with one torch thread)."""
    cache = {}

    def get(name, kind):
        if (name, kind) not in cache:
            model = make_model(tok, seed=len(cache), kind=kind, **CORES[name])
            cache[name, kind] = (model, step_graph(model))
        return cache[name, kind]

    return get


@pytest.mark.parametrize("name,kind", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_step_graph_matches_torch_for_200_steps_at_batch_1_and_5(graphs, name, kind):
    model, proto = graphs(name, kind)
    for batch in (1, 5):  # the graph was traced at batch 2: B is dynamic
        p = check_parity(model, proto, steps=200, batch=batch, seed=batch)
        assert p.max_logit_diff <= TOL and p.max_state_diff <= TOL, (name, kind, p)


def test_layer_normalised_hmlstm_is_as_close_to_exact_as_torch_float32(tok):
    # The layer-normalised HM-LSTM is ill-conditioned: its binary boundaries flip on rounding
    # errors, and torch float32 itself drifts from float64 by 1e-5 within ~20 random steps and
    # by O(1) within 200. So onnxruntime is held to torch float32's own accuracy instead: its
    # distance from the float64 computation at most a few times torch float32's.
    import copy

    model = make_model(tok, kind="glimpse", core="hmlstm", num_layers=2, layer_norm=True).eval()
    sess = _cpu_session(step_graph(model).SerializeToString())
    x, state = _example_inputs(model.config, 16, 5)
    exact = copy.deepcopy(model).double()
    s32, s64, s_ort = (
        unpack_state(state, model.config),
        unpack_state(state.double(), model.config),
        state.numpy(),
    )
    err32 = err_ort = 0.0
    with torch.no_grad():
        for t in range(16):
            _, s32 = model(x[t : t + 1], s32)
            _, s64 = exact(x[t : t + 1].double(), s64)
            _, s_ort = sess.run(None, {"glimpse": x[t].numpy(), "state": s_ort})
            ref = pack_state(s64).numpy()
            err32 = max(err32, np.abs(pack_state(s32).numpy() - ref).max())
            err_ort = max(err_ort, np.abs(s_ort - ref).max())
    assert err_ort <= 4 * err32 + 1e-6, (err_ort, err32)


@pytest.mark.parametrize("kind", ["char", "glimpse"])
def test_step_graph_contract(graphs, kind):
    model, proto = graphs("nlstm-d2", kind)
    cfg = model.config
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == IR_VERSION <= 13
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", OPSET)]

    def sig(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append((v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims))
        return out

    S, V = len(state_slots(cfg)), cfg.out_features
    x = ("tokens", "int64", ["B"]) if kind == "char" else ("glimpse", "float32", ["B", 49])
    assert sig(proto.graph.input) == [x, ("state", "float32", ["B", S, H])]
    assert sig(proto.graph.output) == [
        ("logits", "float32", ["B", V]),
        ("state_out", "float32", ["B", S, H]),
    ]
    ops = {n.op_type for n in proto.graph.node}
    assert ops <= {
        "Gather",
        "Gemm",
        "MatMul",
        "Add",
        "Mul",
        "Sub",
        "Sigmoid",
        "Tanh",
        "Split",
        "Slice",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Reshape",
        "Constant",
        "Identity",
    }
    if kind == "char":
        # the one-hot product is a lookup of the transposed first input weight, (V, 4H)
        gather = next(n for n in proto.graph.node if n.op_type == "Gather")
        inits = {i.name: i for i in proto.graph.initializer}
        assert gather.input[1] == "tokens" and list(inits[gather.input[0]].dims) == [V, 4 * H]
        w = onnx.numpy_helper.to_array(inits[gather.input[0]])
        np.testing.assert_array_equal(w, model.core.layers[0].weight_ih_l0.detach().numpy().T)


# Every core of CORES (a new core without an entry here is a KeyError), each with one input kind:
# the Scan wraps the same step graph whose parity the matrix above checks for both kinds.
SEQ_KINDS = {
    "nlstm-d2": "glimpse",
    "nlstm-d3": "char",
    "nlstm-d2x2": "char",
    "lstm": "glimpse",
    "lstm-stacked": "char",
    "hmlstm": "char",
}
SEQ_CASES = [(name, SEQ_KINDS[name]) for name in CORES]


@pytest.mark.parametrize("name,kind", SEQ_CASES, ids=[f"{n}-{k}" for n, k in SEQ_CASES])
def test_sequence_graph_matches_torch_at_lengths_other_than_the_example(tok, name, kind):
    model = make_model(tok, seed=7, kind=kind, **CORES[name])
    proto = sequence_graph(model)  # traced at T=3, B=2
    assert [n.op_type for n in proto.graph.node] == ["Scan"]  # not a loop unrolled to T=3
    for steps, batch in ((1, 1), (2, 5), (250, 1), (64, 4)):
        p = check_parity(model, proto, steps=steps, batch=batch, seed=steps, sequence=True)
        assert p.max_diff <= TOL, (steps, batch, p)
