"""Where a process sits in a (possibly one-process) data-parallel run, and its collectives.

Several processes (`torchrun --nproc_per_node=N -m training.cli train ...`) train with
DistributedDataParallel: every rank builds the same global batch and takes a disjoint,
contiguous block of its rows (`Dist.rows`). Every helper here is a no-op in a one-process run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.config import ConfigError


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a (possibly one-process) data-parallel run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's contiguous block of n batch rows (blocks differ by at most one row)."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks, in place (t itself in a one-process run)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather_rows(self, state):
        """A carried state of per-layer tuples of this rank's (b, H) rows as one global state of
        (B, H) CPU tensors, lists of lists (None stays None). A collective: every rank calls it."""
        if state is None:
            return None
        if self.world == 1:
            return [[t.detach().cpu() for t in layer] for layer in state]
        out = []
        for layer in state:
            full = []
            for t in layer:
                parts = [torch.empty_like(t) for _ in range(self.world)]
                dist.all_gather(parts, t.contiguous())
                full.append(torch.cat(parts).cpu())
            out.append(full)
        return out


def dist_from_env() -> Dist:
    """This process's place from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(pref: str, local_rank: int = 0, world: int = 1) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={pref} but CUDA is not available; use device=cpu or auto")
        if pref == "cuda":
            pref = f"cuda:{local_rank}" if world > 1 else "cuda"
    return torch.device(pref)


@contextlib.contextmanager
def process_group(info: Dist, device_pref: str) -> Iterator[bool]:
    """Join the process group under torchrun (WORLD_SIZE > 1) unless one is joined already:
    nccl on CUDA, gloo on the CPU. Yields whether it joined one (and so leaves it at the end)."""
    own = info.world > 1 and not dist.is_initialized()
    if own:
        device = resolve_device(device_pref, info.local_rank, info.world)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield own
    finally:
        if own:
            dist.destroy_process_group()


__all__ = ["Dist", "dist_from_env", "process_group", "resolve_device"]
