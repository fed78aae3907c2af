"""What tests/test_nlstm.py and tests/test_nlstm_native.py share: seeded weights, and the fused
sequence against the reference cell stepped by autograd in float64 (outputs, final states and
every gradient), held to the exactness the fused path promises."""

from __future__ import annotations

from typing import NamedTuple

import torch

from training.nlstm import NestedLSTM


def randomize(module: torch.nn.Module, std: float = 0.4, seed: int = 0) -> None:
    """Every parameter drawn from N(0, std^2) with its own generator (the init's scale would
    leave the gates near 0.5, where mistakes hide)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


class FusedCase(NamedTuple):
    layer: NestedLSTM
    x: torch.Tensor  # (T, B, n_in)
    state: tuple  # per layer, depth + 1 tensors (B, H)
    fused: tuple  # (outputs and final states, gradients) through the fused path
    reference: tuple  # the same through the reference cell stepped by autograd

    def assert_exact(self) -> None:
        assert_exact(self.fused, self.reference)


def fused_and_reference(
    depth: int,
    outer: str,
    *,
    n_in: int = 4,
    H: int = 5,
    B: int = 3,
    T: int = 7,
    L: int = 2,
    seed: int = 0,
    std: float = 0.5,
) -> FusedCase:
    """Outputs, final states and gradients (inputs, states, parameters) of the fused path and
    of the reference cell, float64, with a loss that weighs every output differently and a
    gradient into every final state."""
    torch.manual_seed(seed)
    layer = NestedLSTM(n_in, H, depth=depth, num_layers=L, outer_activation=outer).double()
    randomize(layer, std=std, seed=seed)
    x = torch.randn(T, B, n_in, dtype=torch.float64, requires_grad=True)
    state = tuple(
        tuple(torch.randn(B, H, dtype=torch.float64, requires_grad=True) for _ in range(depth + 1))
        for _ in range(L)
    )

    def run(fused: bool):
        layer.fused = fused
        out, final = layer(x, state)
        flat = [out] + [t for s in final for t in s]
        loss = sum(
            (t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in flat
        )
        inputs = [x] + [t for s in state for t in s] + list(layer.parameters())
        return flat, torch.autograd.grad(loss, inputs)

    return FusedCase(layer, x, state, run(True), run(False))


def assert_exact(fused, reference) -> None:
    """Outputs within 1e-12 and gradients within 1e-10 (relative) of the reference."""
    (out_f, grad_f), (out_r, grad_r) = fused, reference
    for a, b in zip(out_f, out_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(grad_f, grad_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
