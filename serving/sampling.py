"""Choosing the next character from logits: greedy, temperature, top-k and top-p (numpy only).

`Sampler` is seeded per request (numpy's PCG64), so the same seed, state and request give the
same text. Validation of the parameters lives in `check_sampling`, whose messages say what is
allowed (the servicer turns them into INVALID_ARGUMENT).
"""

from __future__ import annotations

import math

import numpy as np

LOG2E = 1.0 / math.log(2.0)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not math.isfinite(top_p) or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must lie in [0, 1] (0 or 1 = off), got {top_p}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, in float64 for stable bits."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def bits(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log2 p(target) per row: logits (N, V), targets (N,) -> (N,)."""
    lp = log_softmax(logits)
    return -lp[np.arange(len(targets)), targets] * LOG2E


class Sampler:
    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 0.0, seed: int | None = None,
                 banned: tuple[int, ...] = ()):
        check_sampling(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)
        self.banned = banned  # ids never to emit (the unknown piece, padding, markers)
        # plain temperature sampling: the scheduler samples such rows together
        self.plain = temperature > 0 and not top_k and not 0.0 < top_p < 1.0

    def __call__(self, logits: np.ndarray) -> int:
        """One id from a (V,) logit vector."""
        z = logits.astype(np.float64).copy()
        if self.banned:
            z[list(self.banned)] = -np.inf
        if self.temperature == 0:
            return int(np.argmax(z))
        z = z / self.temperature
        if self.top_k and self.top_k < len(z):
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z[z < kth] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        if 0.0 < self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.top_p) + 1)]  # smallest set reaching top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[keep] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        # inverse CDF: one uniform draw (several times faster than Generator.choice)
        cdf = np.cumsum(p)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), len(p) - 1))
