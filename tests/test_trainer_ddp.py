"""DistributedDataParallel on the CPU: two processes under torchrun with the gloo backend.

Two launches of a worker script train a tiny NLSTM on training/testing/data.py's synthetic stream:
the first through `train()` (which joins and leaves the process group itself, as `nlstm train`
does under torchrun) until max_steps; the second resumes it through a `Trainer` in a group the
script holds, so that each rank can save the weights it ends with. Both ranks must hold the same
weights, rank 0's checkpoint must be them, and the result must match a one-process run of the
same global batch (up to the order of floating-point sums).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.testing.data import stream_prepared
from training.trainer import LAST, read_metrics, train

WORKER = textwrap.dedent(
    """
    import os, sys
    from dataclasses import replace
    from pathlib import Path
    import torch, torch.distributed as dist
    from training.testing.data import stream_prepared
    from training.config import TrainConfig
    from training.trainer import Trainer, dist_from_env, train

    root = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    prepared = stream_prepared(root / f"data{rank}", n_train=6000, n_eval=800)
    cfg = TrainConfig(**eval(os.environ["TEST_CONFIG"]))
    quiet = dict(log=lambda *_: None, progress=False)
    if sys.argv[2] == "first":  # as `nlstm train` under torchrun: train() joins the group
        train(replace(cfg, max_steps=37), root / "run", prepared=prepared, **quiet)
        assert not dist.is_initialized()  # and leaves it
    else:  # relaunched: resume, and keep each rank's final weights
        dist.init_process_group("gloo")
        trainer = Trainer(cfg, root / "run", prepared, dist_info=dist_from_env(), **quiet)
        trainer.run(resume=True)
        torch.save(trainer.model.state_dict(), root / f"weights{rank}.pt")
        trainer.close()
        dist.barrier()
        dist.destroy_process_group()
    """
)

CONFIG = dict(
    task="ptb",
    model={"hidden_size": 16},
    batch_size=4,
    seq_len=25,
    epochs=2,
    checkpoint_every=0,
    seed=5,
)


@pytest.mark.slow
def test_two_cpu_processes_agree_with_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "TEST_CONFIG": repr(CONFIG), "OMP_NUM_THREADS": "1"}
    for part in ("first", "resume"):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tmp_path),
            part,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    w0 = torch.load(tmp_path / "weights0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # DDP kept the ranks in step
    ddp = load_checkpoint(tmp_path / "run" / LAST)
    assert all(torch.equal(w0[k], ddp.model[k]) for k in w0)  # rank 0 wrote them
    assert ddp.extra["trainer"]["world_size"] == 2

    # the same global batch in one process: the same training, up to summation order
    prepared = stream_prepared(tmp_path / "single-data", n_train=6000, n_eval=800)
    train(
        TrainConfig(**CONFIG),
        tmp_path / "single",
        prepared=prepared,
        log=lambda *_: None,
        progress=False,
    )
    one = load_checkpoint(tmp_path / "single" / LAST).model
    for k in one:
        torch.testing.assert_close(w0[k], one[k], rtol=1e-4, atol=1e-5)
    _, e2 = read_metrics(tmp_path / "run")
    _, e1 = read_metrics(tmp_path / "single")
    e2 = [e for e in e2 if e["step"] != 37]  # the extra evaluation where the first part stopped
    assert [e["step"] for e in e2] == [e["step"] for e in e1]
    for a, b in zip(e2, e1, strict=True):
        assert a["valid_bpc"] == pytest.approx(b["valid_bpc"], rel=1e-5)
        assert a["test_bpc"] == pytest.approx(b["test_bpc"], rel=1e-5)
