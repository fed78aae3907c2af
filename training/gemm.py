"""The matrix products of the fused recurrent path, on the fastest kernel the device has.

The NLSTM's fused sequence multiplies the same weights by a small batch (B = 32 rows) at every
time step, and once per backward pass forms each weight gradient as one large product. On the
CPU, PyTorch's float32 `mm` runs MKL, and MKL on AMD processors takes a generic code path: on
the 2-core AMD EPYC (AVX-512) of docs/performance.md, one thread, CPU time, the same run, the
step's (32 x 1200) @ (1200 x 2400) ran at 67-72 GFLOP/s through `torch.mm` against 122-164
through oneDNN, and a 2048^3 product at 94-97 against 210-215. oneDNN is also what
torch.nn.LSTM's CPU kernel runs on, so the baseline we race has it. Here:

  * float32 on the CPU, for weights of at least MIN_ONEDNN_ELEMENTS elements, goes through
    oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the op TorchInductor's CPU backend
    emits for linear layers), with each weight reordered once per sequence into oneDNN's
    blocked layout (`_reorder_linear_weight`) instead of once per call;
  * everything else (small products; float64, which the exactness tests use; CUDA, where
    cuBLAS is the fast kernel; a build without oneDNN) uses torch.mm / addmm, with the same
    row-major layout.

Both compute x @ W^T; they differ only in float32 rounding (about 1e-6 relative). The oneDNN
ops are private, so `onednn_available()` checks once that they exist and give the right answer,
and every caller falls back to torch.mm when they do not.

This file imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Tests switch this off to run the float32 path through torch.mm and compare the two kernels.
ONEDNN = True
# Products with fewer weight (or result) elements than this stay on torch.mm: oneDNN's per-call
# cost (building the primitive, wrapping the tensors) outweighs its faster kernel for small
# ones. Measured with bench/train_speed.py --threads 1 --seq 50 (CPU time, the fused NLSTM
# through each kernel in one run): hidden 32 and 64, MKL 1.32x and 1.15x faster; 75 even; 128,
# oneDNN 1.19x faster; 600, oneDNN 1.8x. 4H x H at H = 128 is 65,536.
MIN_ONEDNN_ELEMENTS = 1 << 16

_available: bool | None = None  # probed on first use


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear ops and they compute x @ W^T (probed once)."""
    global _available
    if _available is None:
        _available = False
        if torch.backends.mkldnn.is_available():
            try:
                w = torch.arange(6, dtype=torch.float32).reshape(3, 2)  # (out 3, in 2)
                x = torch.tensor([[1.0, -2.0]])
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
                y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                _available = torch.equal(y, x @ w.t())
            except (AttributeError, RuntimeError):  # an op renamed or missing in this build
                _available = False
    return _available


def uses_onednn(t: Tensor, elements: int | None = None) -> bool:
    """Whether a product with tensors like `t` (and a weight or result of `elements`
    elements, default t's) goes through oneDNN."""
    if elements is None:
        elements = t.numel()
    return (
        ONEDNN
        and t.device.type == "cpu"
        and t.dtype == torch.float32
        and elements >= MIN_ONEDNN_ELEMENTS
        and onednn_available()
    )


class StepLinear:
    """x @ weight^T (+ bias) (+ add) for one weight and many calls of `batch` rows.

    weight (out, in), bias (out,) or None; x (batch, in) -> (batch, out). Build one per sequence:
    the oneDNN form reorders the weight once here (a copy of it), so the weight must not change
    while the object is in use.
    """

    def __init__(self, weight: Tensor, batch: int, bias: Tensor | None = None) -> None:
        self.bias = bias
        self.onednn = uses_onednn(weight)
        if self.onednn:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch)
        else:
            self.weight = weight.t()  # (in, out) view: x @ W^T
            self.bias_row = None if bias is None else bias.unsqueeze(0)  # (1, out)

    def __call__(self, x: Tensor, out: Tensor | None = None, add: Tensor | None = None) -> Tensor:
        """x @ W^T + bias + add (add: (batch, out) or None); written into `out` when given."""
        if self.onednn:
            if add is None:
                y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            else:  # the addition runs as oneDNN's post-op on the product's output
                y = torch.ops.mkldnn._linear_pointwise.binary(x, add, self.weight, self.bias, "add")
            return y if out is None else out.copy_(y)
        if add is not None and self.bias_row is not None:
            add = add + self.bias_row
        elif add is None:
            add = self.bias_row
        if add is None:
            return torch.mm(x, self.weight) if out is None else torch.mm(x, self.weight, out=out)
        return (
            torch.addmm(add, x, self.weight)
            if out is None
            else torch.addmm(add, x, self.weight, out=out)
        )


def weight_grad(d_out: Tensor, x: Tensor) -> Tensor:
    """d_out^T @ x: (N, out), (N, in) -> (out, in), the gradient of a weight applied to every row
    of x. One large product over all N = T*B positions."""
    if uses_onednn(d_out, d_out.shape[1] * x.shape[1]):
        # oneDNN's linear contracts the last dimensions of both operands and copies a strided
        # first operand into a plain one. The narrower of the two goes first: (x^T d_out)^T, so
        # the copy is x (N, in), not d_out (N, out = 4H); the (in, out) result comes back as a
        # transposed view (autograd lays it out like the weight when it accumulates it).
        if x.shape[1] < d_out.shape[1]:
            return torch.ops.mkldnn._linear_pointwise(x.t(), d_out.t(), None, "none", [], "").t()
        return torch.ops.mkldnn._linear_pointwise(d_out.t(), x.t(), None, "none", [], "")
    return d_out.t() @ x
