"""Choosing the next character from logits: greedy, temperature, top-k and top-p (numpy only).

`Sampler` is seeded per request (numpy's PCG64), so the same seed, state and request give the
same text: each character sampled with a temperature takes the next draw of the request's
uniform stream, whether it is sampled alone (`Sampler.__call__`) or with a batch (`draw`,
`greedy`: the scheduler's vectorised rows, which may take draws ahead and give back those
they did not use). Validation of the parameters lives in `check_sampling`, whose messages say what
is allowed (the servicer turns them into INVALID_ARGUMENT).
"""

from __future__ import annotations

import math

import numpy as np

LOG2E = 1.0 / math.log(2.0)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}"
        )
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
    def __init__(
        self,
        temperature: float,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        banned: tuple[int, ...] = (),
    ):
        check_sampling(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)
        self.banned = banned  # ids never to emit (the unknown piece, padding, markers)
        # plain temperature sampling: the scheduler samples such rows together
        self.plain = temperature > 0 and not top_k and not 0.0 < top_p < 1.0
        self._spare = np.empty(0)  # draws taken ahead and given back (unread), used first

    def next_uniform(self) -> float:
        """The next draw of this request's uniform stream (one per character sampled with a
        temperature)."""
        if self._spare.size:
            u, self._spare = self._spare[0], self._spare[1:]
            return float(u)
        return self.rng.random()

    def uniforms(self, n: int) -> np.ndarray:
        """The next `n` draws of the stream at once (the scheduler takes them ahead)."""
        take, self._spare = self._spare[:n], self._spare[n:]
        return np.concatenate([take, self.rng.random(n - take.size)]) if take.size < n else take

    def unread(self, u: np.ndarray) -> None:
        """Give back draws taken ahead but not used: they come first again, so the text does not
        depend on how far ahead they were taken."""
        if u.size:
            self._spare = np.concatenate([u, self._spare])

    def __call__(self, logits: np.ndarray) -> int:
        """One id from a (V,) logit vector."""
        if self.temperature == 0:
            return int(greedy(logits[None], self.banned)[0])
        if self.plain:  # the scheduler's batched formula, so a draw is the same alone or batched
            return int(
                draw(
                    logits[None],
                    np.array([self.temperature]),
                    np.array([self.next_uniform()]),
                    self.banned,
                )[0]
            )
        z = logits.astype(np.float64) / self.temperature
        if self.banned:
            z[list(self.banned)] = -np.inf
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
        return int(
            min(np.searchsorted(cdf, self.next_uniform() * cdf[-1], side="right"), len(p) - 1)
        )


def draw(
    logits: np.ndarray, temperature: np.ndarray, u: np.ndarray, banned: tuple[int, ...] = ()
) -> np.ndarray:
    """Temperature sampling of every row at once: logits (n, V), temperature (n,) > 0, u (n,)
    uniform draws in [0, 1) -> (n,) ids, row i's the inverse CDF of softmax(logits[i] /
    temperature[i]) at u[i], never one of `banned`. In float64, as Sampler's own rows."""
    # numpy's ufuncs called directly (add.accumulate is cumsum, maximum.reduce is max) skip the
    # Python wrappers around them, most of the time this takes for a few rows
    if len(logits) == 1:  # one stream: the same arithmetic on one row, in half the time
        z = logits[0] / temperature[0]
        if banned:
            z[list(banned)] = -np.inf
        z -= np.maximum.reduce(z)
        cdf = np.add.accumulate(np.exp(z, out=z), out=z)
        # the number of CDF values <= the draw, counted as below (so a row that is not finite
        # gives the same id alone as in a batch)
        return np.array([min(int(np.add.reduce(cdf <= u[0] * cdf[-1])), len(cdf) - 1)])
    z = logits / temperature[:, None]  # float32 logits / float64 temperatures: float64
    if banned:
        z[:, list(banned)] = -np.inf
    z -= np.maximum.reduce(z, axis=1, keepdims=True)
    cdf = np.add.accumulate(np.exp(z, out=z), axis=1, out=z)
    below = np.add.reduce(cdf <= (u * cdf[:, -1])[:, None], axis=1, dtype=np.int64)
    return np.minimum(below, logits.shape[1] - 1, out=below)


def greedy(logits: np.ndarray, banned: tuple[int, ...] = ()) -> np.ndarray:
    """The most likely id of every row of (n, V) logits that is not one of `banned`."""
    if banned:
        logits = logits.copy()
        logits[:, list(banned)] = -np.inf
    return logits.argmax(axis=1)
