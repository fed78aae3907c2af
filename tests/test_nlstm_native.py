"""The fused NLSTM's C++ step kernels (training/nlstm_native.py, training/nlstm_cpu.cpp): built
here, the same function as the reference cell in float64, the same as the torch ops in float32,
and the fallback to the torch ops when they cannot be built, with its one status line."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
import torch
from nlstm_exactness import fused_and_reference
from torch.utils import cpp_extension

from training import nlstm_native
from training.config import TrainConfig
from training.nlstm import NestedLSTM
from training.testing.data import stream_prepared
from training.trainer import Trainer


def can_build() -> bool:
    return (
        shutil.which("c++") is not None
        and cpp_extension.is_ninja_available()
        and nlstm_native.cpu_level() in nlstm_native.ISA_FLAGS
    )


needs_build = pytest.mark.skipif(not can_build(), reason="no C++ compiler, ninja or AVX2 here")


class Counting:
    """The kernels module, counting the calls the fused path makes into it."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def __getattr__(self, name):
        self.calls += 1
        return getattr(self.module, name)


@pytest.fixture
def fresh(monkeypatch):
    """nlstm_native as if nothing had tried to build the kernels in this process yet (the
    loaded module stays importable; monkeypatch restores the real state afterwards)."""
    monkeypatch.setattr(nlstm_native, "_module", None)
    monkeypatch.setattr(nlstm_native, "_status", None)
    monkeypatch.setattr(nlstm_native, "ENABLED", True)


def spy(monkeypatch) -> list[Counting]:
    """Route the fused path's kernel look-ups through a counter; returns the counters used."""
    seen: list[Counting] = []
    real = nlstm_native.usable

    def usable(t):
        module = real(t)
        if module is None:
            return None
        seen.append(Counting(module))
        return seen[-1]

    monkeypatch.setattr(nlstm_native, "usable", usable)
    return seen


# ------------------------------------------------------------------------------- the kernels
@needs_build
def test_the_kernels_build_here(fresh):
    assert nlstm_native.kernels() is not None
    line = nlstm_native.status()
    assert line.startswith("fused NLSTM: C++ step kernels") and "loaded" in line, line
    assert str(nlstm_native.build_dir()) in line


def test_the_build_goes_to_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert nlstm_native.build_dir() == tmp_path / "ext"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert nlstm_native.build_dir() == tmp_path / "cache" / "nlstm" / "torch_extensions"


@needs_build
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("outer", ["identity", "tanh"])
@pytest.mark.parametrize("H", [5, 19])  # 19: full vectors and a tail at either width
def test_kernels_equal_the_reference_cell_in_float64(depth, outer, H, monkeypatch):
    seen = spy(monkeypatch)
    case = fused_and_reference(depth, outer, H=H)
    # the forward and the backward of both layers took the kernels, every step
    assert len(seen) == 4 and all(c.calls > 0 for c in seen)
    case.assert_exact()


@needs_build
@pytest.mark.parametrize("depth", [1, 3])
def test_rows_split_across_threads_equal_the_reference_cell(depth, monkeypatch):
    """H = 300, B = 16: 4H = 1,200 gate elements a row, so each kernel call's rows go to two
    threads (ROW_GRAIN 16,384 elements: shares of at least 13 rows); float64 against the
    reference cell. At this width the two sides' products sum 1,200-term rows in different
    orders, so a few gradient elements near zero differ by ~1e-11 (with one thread too): the
    tolerance is 1e-9, far below what a misplaced or skipped row would give."""
    seen = spy(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        case = fused_and_reference(depth, "tanh", n_in=3, H=300, B=16, T=3, L=1)
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 2 and all(c.calls > 0 for c in seen)
    (out_f, grad_f), (out_r, grad_r) = case.fused, case.reference
    for a, b in zip(out_f + list(grad_f), out_r + list(grad_r), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@needs_build
def test_rows_split_across_threads_change_no_bit():
    """Each kernel on one thread and on two threads, the same inputs: identical outputs (rows
    are independent, so splitting them reorders no arithmetic)."""
    cpp = nlstm_native.kernels()
    assert cpp is not None
    torch.manual_seed(0)
    B, H = 16, 300
    gates = [torch.randn(B, 4 * H) for _ in range(2)]
    add, c_prev = torch.randn(B, 4 * H), torch.randn(B, H)
    dh, d_hs = torch.randn(B, H), torch.randn(B, H)
    d_uv = torch.randn(B, 2 * H)

    def run(threads):
        torch.set_num_threads(threads)
        g = [x.clone() for x in gates]
        uv = torch.empty(B, 2 * H)
        cpp.down(g[0], c_prev, uv, True, add)
        mems, tanhs, h = (
            [torch.empty(B, H) for _ in range(2)],
            [torch.empty(B, H) for _ in range(2)],
            torch.empty(B, H),
        )
        cpp.up(g, c_prev, True, mems, tanhs, h, None)
        dc, dA = (
            [torch.randn(B, H, generator=torch.Generator().manual_seed(k)) for k in range(2)],
            [torch.empty(B, 4 * H) for _ in range(2)],
        )
        cpp.back_inner(dh, d_hs, g, tanhs, dc, dA, c_prev, True)
        cpp.back_level(d_uv, g[0], c_prev, dA[0], dc[0], True)
        return [*g, uv, *mems, *tanhs, h, *dc, *dA]

    before = torch.get_num_threads()
    try:
        one, two = run(1), run(2)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


@needs_build
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_kernels_equal_the_torch_ops_in_float32(depth, monkeypatch):
    """float32 at a size where the products go through oneDNN: the kernels against the torch
    ops of the fallback, up to float32 rounding (the float64 tests pin the math)."""
    torch.manual_seed(0)
    layer = NestedLSTM(50, 160, depth=depth, num_layers=2)
    tokens = torch.randint(0, 50, (12, 8))
    h0 = tuple(tuple(torch.randn(8, 160) * 0.5 for _ in range(depth + 1)) for _ in range(2))

    def run(enabled):
        monkeypatch.setattr(nlstm_native, "ENABLED", enabled)
        out, final = layer(tokens, h0)
        flat = [out] + [t for s in final for t in s]
        loss = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in flat)
        return flat + list(torch.autograd.grad(loss, list(layer.parameters())))

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.long  # a second build (~40 s of CPU): .ci/run's second step
@pytest.mark.skipif(
    not can_build() or nlstm_native.cpu_level() != "AVX512",
    reason="needs an AVX-512 CPU (the AVX2 build is the default elsewhere) and a compiler",
)
def test_the_avx2_build_equals_the_reference_cell(fresh, monkeypatch):
    """NLSTM_CPP_LEVEL=AVX2 builds the AVX2 kernels on an AVX-512 machine (a second build:
    ~40 s the first time), so that both widths are checked where one machine has both."""
    monkeypatch.setenv("NLSTM_CPP_LEVEL", "AVX2")
    assert "(AVX2) loaded" in nlstm_native.status()
    seen = spy(monkeypatch)
    for depth in (1, 3):
        fused_and_reference(depth, "tanh", H=19).assert_exact()
    assert seen and all(c.calls > 0 for c in seen)


# ------------------------------------------------------------------------------ the fallback
def test_an_unsupported_cpu_falls_back_to_the_torch_ops(fresh, monkeypatch):
    monkeypatch.setenv("NLSTM_CPP_LEVEL", "DEFAULT")
    assert nlstm_native.kernels() is None
    line = nlstm_native.status()
    assert "unavailable" in line and "CPU level DEFAULT" in line and "pure-PyTorch" in line
    assert len(line.splitlines()) == 1
    seen = spy(monkeypatch)
    fused_and_reference(2, "identity").assert_exact()
    assert seen == []  # no kernel was asked for: the torch ops ran


def test_a_failed_build_falls_back_to_the_torch_ops(fresh, monkeypatch, tmp_path):
    """A real build that fails (the compiler is missing): one status line says why, and the
    fused path runs its torch ops with the same results."""
    if nlstm_native.cpu_level() not in nlstm_native.ISA_FLAGS:
        pytest.skip("this CPU never tries the build")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert nlstm_native.kernels() is None
    line = nlstm_native.status()
    assert "unavailable" in line and "pure-PyTorch" in line and len(line.splitlines()) == 1
    assert nlstm_native.kernels() is None  # tried once per process, not at every call
    for depth in (1, 3):
        fused_and_reference(depth, "tanh", H=19).assert_exact()


def test_switched_off_the_torch_ops_run(monkeypatch):
    monkeypatch.setattr(nlstm_native, "ENABLED", False)
    assert nlstm_native.kernels() is None
    assert "switched off" in nlstm_native.status()
    seen = spy(monkeypatch)
    fused_and_reference(3, "identity").assert_exact()
    assert seen == []


def test_the_trainer_logs_the_kernels_status(tmp_path, monkeypatch, fresh):
    monkeypatch.setenv("NLSTM_CPP_LEVEL", "DEFAULT")  # the fallback's line, without a build
    stream = stream_prepared(tmp_path / "data", n_train=600, n_eval=100)
    logs: list[str] = []
    cfg: dict[str, Any] = dict(task="ptb", batch_size=4, seq_len=25, epochs=1, checkpoint_every=0)
    nlstm = TrainConfig(**cfg, model={"hidden_size": 12})
    Trainer(nlstm, tmp_path / "run", prepared=stream, log=logs.append, progress=False)
    lines = [line for line in logs if line.startswith("fused NLSTM:")]
    assert len(lines) == 1 and "pure-PyTorch" in lines[0], logs
    logs.clear()  # other cores have no such line
    Trainer(
        TrainConfig(**cfg, model={"hidden_size": 12, "core": "lstm"}),
        tmp_path / "lstm",
        prepared=stream,
        log=logs.append,
        progress=False,
    )
    assert not any(line.startswith("fused NLSTM:") for line in logs), logs
