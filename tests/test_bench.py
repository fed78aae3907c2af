"""Every benchmark script has a smoke mode, and it runs."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_models(tmp_path_factory) -> Path:
    """A random character model and the bundled glimpse classifier, exported once for the
    serving benchmarks' smoke runs (an export takes about 10 s)."""
    spec = importlib.util.spec_from_file_location("_server", REPO / "bench" / "_server.py")
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    return shared.tiny_models(tmp_path_factory.mktemp("models"))


def run_bench(script: str, *args: str) -> dict:
    """Run bench/<script> and return the JSON object its last line prints."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_train_speed_smoke():
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "train_speed.py"),
            "--smoke",
            "--device",
            "cpu",
            "--kinds",
            "nn.LSTM",
            "nlstm-fused",
            "nlstm-ops",
            "nlstm-mkl",
            "nlstm-loop",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=True,
    ).stdout
    lines = [line for line in out.splitlines() if "chars/s" in line]
    kinds = ["nn.LSTM", "nlstm-fused", "nlstm-ops", "nlstm-mkl", "nlstm-loop"]
    assert [line.split()[0] for line in lines] == kinds * 2  # by wall time, by CPU time
    assert out.startswith("fused NLSTM: C++ step kernels")  # loaded, or why the ops run
    assert "large-GEMM peak this run: torch.mm" in out
    (result,) = json.loads(out.splitlines()[-1])
    assert result["device"] == "cpu" and result["peak_gflops"] > 0
    # a peak per clock (by wall time with every thread, by CPU time), each printed
    assert result["peak_gflops_by_clock"]["cpu"] == result["peak_gflops"]
    assert result["peak_gflops_by_clock"]["wall"] > 0
    assert "GFLOP/s (by wall time)" in out and "GFLOP/s (by CPU time)" in out
    assert list(result["kinds"]) == kinds
    for r in result["kinds"].values():
        for clock in ("wall", "cpu"):
            assert r[f"{clock}_chars_per_s"] > 0 and r[f"{clock}_ratio"] > 0
            # FLOPs per step over time against the peak measured in the same run
            assert r[f"{clock}_peak_fraction"] == pytest.approx(
                r[f"{clock}_gflops"] / result["peak_gflops_by_clock"][clock]
            )
        assert r["gflop_per_step"] > 0
    assert result["kinds"]["nn.LSTM"]["wall_ratio"] == 1.0


def test_hmlstm_copy_smoke():
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hmlstm_copy.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=True,
    ).stdout
    assert "layer 2:" in out and "saved" in out


def test_hmlstm_copy_reads_a_text_file_with_the_checkpoints_tokenizer(tmp_path):
    """--checkpoint with --text-file: the counts are those of the model over the encoded text."""
    import re

    import torch

    from serving.formats import Tokenizer
    from training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from training.data.tokenizer import train_char_tokenizer
    from training.models import ModelConfig, build_model

    text = "the cat sat on the mat\na dog ran in the park\nwe saw the stars at night\n"
    tok = train_char_tokenizer(text.splitlines(), newline=True)
    torch.manual_seed(0)
    cfg = ModelConfig(
        kind="char", core="hmlstm", hidden_size=8, num_layers=3, vocab_size=tok.vocab_size
    )
    model = build_model(cfg)  # seed 0: every operation occurs over this text
    save_checkpoint(
        Checkpoint(
            task="ptb", model_config=cfg, model=model.state_dict(), tokenizer=tok.model_proto
        ),
        tmp_path / "best.pt",
    )
    full = text + "q€\n"  # two characters outside the vocabulary
    (tmp_path / "valid.txt").write_text(full, encoding="utf-8")
    T = len(full) // 2  # 37: under --smoke's 40 steps, the text sets the length
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "hmlstm_copy.py"),
            "--smoke",
            "--batch",
            "2",
            "--checkpoint",
            str(tmp_path / "best.pt"),
            "--text-file",
            str(tmp_path / "valid.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "2 characters outside the checkpoint's vocabulary" in out
    assert f"HM-LSTM 3x8, batch 2, {T} steps, input: {tmp_path / 'valid.txt'}" in out
    # the same counts as the model over the same ids, laid out as (T, B) rows of the text
    ids = Tokenizer.from_bytes(tok.model_proto).encode(full).ids[: 2 * T]
    ids = torch.as_tensor(ids).view(2, T).t()  # (T, B): row b reads characters b*T ..
    core = load_checkpoint(tmp_path / "best.pt").build_model().core.eval()
    with torch.no_grad():
        *_, counts = core(ids, return_boundaries=True)
    ops = re.findall(r"UPDATE +(\d+) +COPY +(\d+) +FLUSH +(\d+)", out)
    printed = [tuple(map(int, m)) for m in ops]
    assert printed == [(c["update"], c["copy"], c["flush"]) for c in counts]
    assert all(sum(c) == 2 * T for c in printed) and "saved" in out
    assert all(sum(c[k] for c in printed) > 0 for k in range(3))  # UPDATE, COPY and FLUSH all occur

    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "hmlstm_copy.py"), "--text-file", "x"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 2 and "--text-file needs --checkpoint" in proc.stderr


def test_soak_smoke(bench_models):
    result = run_bench("soak.py", "--smoke", "--models", str(bench_models))
    assert result["passed"] and not result["soak"]["errors"]
    for rpc in ("Generate", "Score", "ClassifyGlimpses", "CreateSession", "CloseSession"):
        assert result["soak"]["rpcs"][rpc]["calls"] > 0
    assert result["soak"]["rss_mib"]["end"] > 0


def test_faults_smoke(bench_models):
    result = run_bench("faults.py", "--smoke", "--models", str(bench_models))
    assert [(f["name"], f["passed"], f["failures"]) for f in result["faults"]] == [
        (n, True, []) for n in "abcde"
    ]


def test_abuse_smoke(bench_models):
    result = run_bench("abuse.py", "--smoke", "--models", str(bench_models))
    assert [(f["name"], f["passed"], f["failures"]) for f in result["abuse"]] == [
        (n, True, []) for n in "fghijk"
    ]


def test_fuzz_smoke(bench_models):
    result = run_bench("fuzz.py", "--smoke", "--models", str(bench_models))
    from serving.api.nlstm.v1 import inference_pb2 as pb

    # every rpc of the service was fuzzed
    rpcs = set(pb.DESCRIPTOR.services_by_name["Inference"].methods_by_name)
    assert result["passed"] and set(result["fuzz"]) == rpcs
    for rpc, r in result["fuzz"].items():
        assert (
            r["sent"] == 10
            and not r["internal"]
            and not r["broken"]
            and r["alive"]
            and r["good_after"]
        ), rpc
        assert r["rss_mib"] > 0, rpc
    assert result["rss_growth_mib"] <= 64


def test_serve_load_smoke_on_sessions():
    if shutil.which("redis-server") is None:
        pytest.skip(
            "redis-server is not installed (Debian: apt-get install redis-server; .ci/run does)"
        )
    result = run_bench("serve_load.py", "--smoke", "--stores", "memory", "redis")
    assert [(r["streams"], r["store"]) for r in result["results"]] == [
        (4, "memory"),
        (4, "redis"),
        (1, "memory"),
        (1, "redis"),
    ]
    for r in result["results"]:  # every stream on its own session, continued by each of its calls
        assert r["server"]["chars"] > 0 and min(r["ratios"]) > 0


def test_store_ops_smoke():
    if shutil.which("redis-server") is None:
        pytest.skip(
            "redis-server is not installed (Debian: apt-get install redis-server; .ci/run does)"
        )
    result = run_bench("store_ops.py", "--smoke")
    assert set(result["results"]) == {"redis", "file"}
    for ops in result["results"].values():
        assert set(ops) == {"acquire", "checkpoint", "release"}
        assert all(v["wall_us"] > 0 and v["cpu_us"] >= 0 for v in ops.values())


def test_serve_load_smoke():
    result = run_bench("serve_load.py", "--smoke", "--interval-ms", "0", "20")
    runs = {(r["streams"], r["interval_ms"]) for r in result["results"]}
    assert runs == {(4, 0.0), (4, 20.0), (1, 0.0), (1, 20.0)}
    for r in result["results"]:
        # two server windows, each between two raw windows (the raw process refuses to load torch)
        steps = r["raw"]["window_step_s"]
        assert (
            r["server"]["chars"] > 0
            and len(steps) == 3
            and min(steps) > 0
            and len(r["ratios"]) == 2
        )
        assert r["raw"]["char_steps_per_s"] == pytest.approx(r["streams"] / np.mean(steps))
        assert r["ratio"] == pytest.approx(np.median(r["ratios"])) and min(r["ratios"]) > 0
        assert r["server"]["server_cpu"] > 0 and 0 <= r["server"]["step_graph_share"] <= 1.05


def test_prefix_cache_smoke():
    """Two real servers (--prefix-cache-mb 0 and the default cache) on the bundled PTB model:
    the same texts, and the cached server skips the prompt (hits counted, time lower)."""
    result = run_bench("prefix_cache.py", "--smoke")
    assert result["identical"] and result["prompt_chars"] == 200 and result["goal"] is None
    # per kind and round one hit: the same prompt skips 200 characters, with an ending too
    assert result["cache"] == {"hits": 4.0, "misses": 2.0, "skipped_chars": 800.0}
    assert result["cache_bytes"] > 0
    for kind in ("same", "ending"):
        r = result["results"][kind]
        assert len(r["off_all_ms"]) == len(r["on_all_ms"]) == 2 and min(r["on_all_ms"]) > 0
    # 201 steps against one sample: far more than 2x even on a loaded machine
    assert result["results"]["same"]["ratio"] > 2


def test_scheduler_overhead_smoke():
    out = run_bench("scheduler_overhead.py", "--smoke")
    assert [r["boundaries"] for r in out["results"]] == [True, False]
    assert all(r["cpu_us_per_step"] > 0 for r in out["results"])


def test_quantized_smoke():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "quantized.py"), "--smoke", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    (pair,) = result["pairs"].values()
    for b in ("1", "64"):
        assert (
            min(pair["step"]["cpu_us"][b].values()) > 0 and len(pair["step"]["wall_ratios"][b]) == 2
        )
    assert pair["serve"]["chars_per_s"]["int8"] > 0 and len(pair["serve"]["ratios"]) == 1
    assert pair["sizes_mib"]["int8"] < pair["sizes_mib"]["float32"]
