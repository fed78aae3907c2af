"""The fused NLSTM as CUDA graphs (training.nlstm_graphs) and the `cuda_graphs` option.

The graphs themselves need CUDA: those tests are marked `gpu` (bench/gpu_check.py runs them on a
lent GPU). What runs on the CPU is tested here on the CPU: the option reaches the model through
the trainer, is refused for cores it does not apply to, and changes nothing off CUDA.
"""

from __future__ import annotations

import pytest
import torch

from training.checkpoint import load_checkpoint
from training.config import ConfigError, TrainConfig
from training.nlstm import NestedLSTM
from training.testing.data import stream_prepared
from training.trainer import LAST, Trainer, train

QUIET = {"log": lambda *_: None, "progress": False}


def _cfg(**kw) -> TrainConfig:
    base = {
        "task": "ptb",
        "model": {"hidden_size": 12},
        "batch_size": 4,
        "seq_len": 25,
        "epochs": 1,
        "checkpoint_every": 0,
        "seed": 3,
        "max_steps": 6,
    }
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return stream_prepared(tmp_path_factory.mktemp("stream"), n_train=4000, n_eval=400)


def test_cuda_graphs_option_reaches_the_core_and_changes_nothing_on_the_cpu(tmp_path, stream):
    logs = []
    t = Trainer(
        _cfg(cuda_graphs=True, device="cpu"),
        tmp_path / "g",
        stream,
        log=logs.append,
        progress=False,
    )
    assert t.model.core.cuda_graphs is True
    assert any("cuda_graphs: ignored on cpu" in line for line in logs)
    t.close()
    train(_cfg(cuda_graphs=True, device="cpu"), tmp_path / "a", prepared=stream, **QUIET)
    train(_cfg(device="cpu"), tmp_path / "b", prepared=stream, **QUIET)
    a, b = (
        load_checkpoint(tmp_path / "a" / LAST).model,
        load_checkpoint(tmp_path / "b" / LAST).model,
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cuda_graphs_is_refused_for_other_cores(tmp_path, stream):
    with pytest.raises(ConfigError, match="cuda_graphs applies to the nlstm core only, not 'lstm'"):
        Trainer(
            _cfg(cuda_graphs=True, model={"hidden_size": 12, "core": "lstm"}),
            tmp_path,
            stream,
            **QUIET,
        )


def _graphed_and_eager(layer, x, state, steps=3, lr=0.05):
    """Train two copies of `layer` a few SGD steps, one with CUDA graphs: outputs, final states
    and gradients of every step, for both."""
    results = []
    for graphs in (True, False):
        torch.manual_seed(0)
        model = type(layer)(
            layer.input_size,
            layer.hidden_size,
            layer.depth,
            layer.num_layers,
            layer.outer_activation,
        ).to(x.device, dtype=next(layer.parameters()).dtype)
        model.load_state_dict(layer.state_dict())
        model.cuda_graphs = graphs
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        seen = []
        for _ in range(steps):  # the graphs must read the weights as updated in place
            opt.zero_grad()
            out, final = model(x, state)
            flat = [out] + [t for s in final for t in s]
            loss = sum(
                (
                    t * torch.linspace(-1, 1, t.numel(), device=x.device, dtype=t.dtype).view_as(t)
                ).sum()
                for t in flat
            )
            loss.backward()
            seen += [t.detach().clone() for t in flat] + [
                p.grad.clone() for p in model.parameters()
            ]
            opt.step()
        results.append(seen)
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_graphed_sequence_equals_the_eager_fused_path_float64(depth):
    torch.manual_seed(depth)
    layer = NestedLSTM(7, 9, depth=depth, num_layers=2).double().cuda()
    x = torch.randint(0, 7, (11, 5), device="cuda")
    state = tuple(
        tuple(torch.randn(5, 9, dtype=torch.float64, device="cuda") for _ in range(depth + 1))
        for _ in range(2)
    )
    graphed, eager = _graphed_and_eager(layer, x, state)
    for a, b in zip(graphed, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
def test_graphed_sequence_float32_paper_size_and_shape_cache():
    torch.manual_seed(0)
    layer = NestedLSTM(50, 600, depth=2).cuda()
    for T, B in [(100, 32), (37, 32)]:  # a second shape captures a second pair of graphs
        x = torch.randint(0, 50, (T, B), device="cuda")
        graphed, eager = _graphed_and_eager(layer, x, None, steps=2, lr=1e-3)
        for a, b in zip(graphed, eager, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_two_forwards_before_a_backward_are_refused():
    layer = NestedLSTM(5, 8, depth=2, cuda_graphs=True).cuda()
    x = torch.randint(0, 5, (6, 3), device="cuda")
    out1, _ = layer(x)
    out2, _ = layer(x)  # overwrites the activations the first forward saved
    out2.sum().backward()  # the latest one is fine
    with pytest.raises(RuntimeError, match="run forward again"):
        out1.sum().backward()


@pytest.mark.gpu
def test_graphs_are_not_used_under_no_grad():
    layer = NestedLSTM(5, 8, depth=2, cuda_graphs=True).cuda()
    with torch.no_grad():
        a, _ = layer(torch.randint(0, 5, (6, 3), device="cuda"))
    assert not layer.layers[0].__dict__.get("_cuda_graphs")
    assert a.shape == (6, 3, 8)


@pytest.mark.gpu
def test_trainer_with_cuda_graphs_matches_without(tmp_path, stream):
    train(_cfg(cuda_graphs=True, device="cuda"), tmp_path / "a", prepared=stream, **QUIET)
    train(_cfg(device="cuda"), tmp_path / "b", prepared=stream, **QUIET)
    a, b = (
        load_checkpoint(tmp_path / "a" / LAST).model,
        load_checkpoint(tmp_path / "b" / LAST).model,
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
