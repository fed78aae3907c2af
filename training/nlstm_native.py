"""The optional C++ step kernels of the fused NLSTM on the CPU: building, loading, falling back.

training/nlstm_cpu.cpp fuses each time step's pointwise work (the gates' activations, the inner
and outer memory updates, and the backward's derivatives) into one pass per level, which
training/nlstm_fused.py's `sequence_forward` / `sequence_backward` call between their matrix
products. It is compiled on first use with torch.utils.cpp_extension (a C++ compiler and ninja
are needed at run time) into a cache folder, never into the checkout:
$TORCH_EXTENSIONS_DIR when set, else ($XDG_CACHE_HOME or ~/.cache)/nlstm/torch_extensions. The
build's name carries a hash of the source and flags, so an edited kernel or another CPU level
builds anew. It is built for the vector level torch's own kernels run at (AVX2 or AVX-512:
ATen's Vectorized types over Sleef, as those kernels are); on other CPUs it is not built.

When the build fails or no compiler exists, `kernels()` returns None, `status()` says why in
one line (the trainer logs it), and the fused path runs its pure-PyTorch loops: the same
function, one small op at a time. `ENABLED = False` (tests) forces that fallback.

This file imports only torch (and the standard library).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

# Tests switch this off to run the pure-PyTorch loops, and to compare the two.
ENABLED = True

SOURCE = Path(__file__).with_name("nlstm_cpu.cpp")

_module: ModuleType | None = None
_status: str | None = None  # None until the first load attempt


def build_dir() -> Path:
    """Where the compiled kernels go: $TORCH_EXTENSIONS_DIR, else the user's cache folder."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nlstm" / "torch_extensions"


# The vector instructions the kernels are built for, per CPU level torch reports, with the flags
# torch builds its own kernels of that level with. Elsewhere (no AVX2, other architectures) ATen's
# portable vector code measured slower than torch's own ops (fused forward 71 ms a sequence
# against 24 for AVX2 and 15 for AVX-512, hidden 600, batch 32, 100 steps), so the torch loops run.
ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}


def cpu_level() -> str:
    """The CPU level to build for: $NLSTM_CPP_LEVEL (AVX2 on an AVX-512 machine, for
    measuring), else the one torch dispatches its own kernels to."""
    return os.environ.get("NLSTM_CPP_LEVEL") or torch.backends.cpu.get_cpu_capability()


def _load() -> ModuleType:
    from torch.utils import cpp_extension  # imported here: it is slow and only needed once

    level = cpu_level()
    if level not in ISA_FLAGS:
        raise RuntimeError(f"CPU level {level}: the kernels are built for AVX2 or AVX512 only")
    # -fopenmp: the kernels split a block's rows across torch's intra-op threads with
    # at::parallel_for, whose OpenMP form is compiled into the caller; the extension then needs
    # libgomp.so.1, which the loader resolves to the one torch has already loaded (one runtime,
    # one thread pool)
    flags = [
        "-O3",
        "-fopenmp",
        *ISA_FLAGS[level],
        f"-DCPU_CAPABILITY={level}",
        f"-DCPU_CAPABILITY_{level}",
    ]
    source = SOURCE.read_text()
    digest = hashlib.sha256((source + " ".join(flags) + torch.__version__).encode()).hexdigest()
    directory = build_dir() / f"nlstm_cpu_{digest[:12]}"
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=f"nlstm_cpu_{digest[:12]}",
        sources=[str(SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(directory),
        verbose=False,
    )


def kernels() -> ModuleType | None:
    """The compiled kernels, building them on the first call; None when they cannot be built
    (see `status()`) or ENABLED is off."""
    global _module, _status
    if not ENABLED:
        return None
    if _status is None:
        try:
            _module = _load()
            _status = f"C++ step kernels ({cpu_level()}) loaded from {build_dir()}"
        except Exception as e:  # no compiler, no ninja, a failed build: run the torch loops
            _module = None
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            _status = (
                f"C++ step kernels unavailable ({type(e).__name__}: {first[:200]}); "
                "using the pure-PyTorch fused loops (same results, slower)"
            )
    return _module


def status() -> str:
    """One line on the kernels: loaded (and where), or why the fused path falls back. Tries the
    build if nothing has tried it yet."""
    if not ENABLED:
        return "C++ step kernels switched off; using the pure-PyTorch fused loops"
    kernels()
    assert _status is not None
    return f"fused NLSTM: {_status}"


def usable(t: Tensor) -> ModuleType | None:
    """The kernels for the fused path's tensors like `t` (CPU, float32 or float64), or None."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return None
    return kernels()
