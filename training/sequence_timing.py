"""Is an export's sequence graph faster than its step graph? Measured as a server would see it.

    python -m training.sequence_timing FOLDER [STEPS [REPEATS]]

prints one JSON line: the best of REPEATS (default 3) interleaved rounds of scoring STEPS
(default 256) random inputs at batch 1 with serving.runtime on onnxruntime's CPU provider, through
the step graph called once per input (what the runtime does without a sequence graph) and
through one call of the sequence graph; and whether torch or other training code was loaded.

training/export.py runs it in a fresh interpreter on the finished temporary folder: torch's
thread pools, loaded in the exporting process, slow onnxruntime 2.5-3.5x and would skew the
comparison. So this module imports serving.runtime and numpy, never torch nor the rest of
training (the `training` package itself imports nothing).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from serving.runtime import ExportedModel, load_model


def measure(folder: str, steps: int = 256, repeats: int = 3) -> dict:
    seq = load_model(folder, providers="cpu", intra_op_threads=0, inter_op_threads=1)
    # the same step session without the sequence graph: what load_model gives a folder without
    # one, whose run() calls the step graph once per input
    loop = ExportedModel(seq.folder, seq.meta, seq.tokenizer, seq._step, None)
    rng = np.random.default_rng(0)
    x: np.ndarray
    if seq.meta.input_dtype == "int64":
        x = rng.integers(0, seq.output_size, size=(steps, 1))  # (T, 1) token ids
    else:
        input_size = seq.meta.input_size
        if input_size is None:
            raise ValueError(f"{folder}: a model of float inputs whose meta.json has no input_size")
        x = rng.random((steps, 1, input_size), dtype=np.float32)  # (T, 1, in)
    loop_s, seq_s = [], []
    for _ in range(repeats + 1):  # the first round warms both up and is dropped
        t0 = time.perf_counter()
        loop.run(x)
        t1 = time.perf_counter()
        seq.run(x)
        t2 = time.perf_counter()
        loop_s.append(t1 - t0)
        seq_s.append(t2 - t1)
    return {
        "loop_s": min(loop_s[1:]),
        "sequence_s": min(seq_s[1:]),
        "torch": "torch" in sys.modules,
        # training code (run with -m, this module is __main__; its package imports nothing)
        "training": any(k.startswith("training.") for k in sys.modules),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 3:
        print("usage: python -m training.sequence_timing FOLDER [STEPS [REPEATS]]", file=sys.stderr)
        return 2
    steps = int(args[1]) if len(args) > 1 else 256
    repeats = int(args[2]) if len(args) > 2 else 3
    print(json.dumps(measure(args[0], steps, repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
