"""What the serving benchmarks share beyond serving.testing (the `nlstm serve` and
`redis-server` processes, serving/testing/process.py): small exported models and pieces of
client traffic.

`models_folder` gives a models folder: the one asked for, or a temporary one of tiny models
(`tiny_models`: a random character model beside the bundled MNIST classifier, exported with
torch in the calling process; the server never imports torch). `pick_models` and
`glimpse_requests` build client traffic; `readme_lines` are the texts random models are
trained on and the benchmarks score.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from training.testing.models import export_random_char

REPO = Path(__file__).resolve().parents[1]
BUNDLED_GLIMPSE = REPO / "exported" / "mnist-nlstm"
RANDOM_MODEL = "random-nlstm"  # the random character model's folder name


def readme_lines() -> list[str]:
    """The README's non-empty lines: the training text of random character models' vocabulary
    and the texts the benchmarks score."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]


def tiny_models(out: Path, hidden: int = 16) -> Path:
    """A models folder for quick runs: a random character model of `hidden` cells and a link
    to the bundled MNIST glimpse classifier (exported/mnist-nlstm). Returns `out`."""
    export_random_char(out / RANDOM_MODEL, hidden, readme_lines())
    (out / BUNDLED_GLIMPSE.name).symlink_to(BUNDLED_GLIMPSE, target_is_directory=True)
    return out


@contextlib.contextmanager
def models_folder(models: Path | None) -> Iterator[Path]:
    """`models`, or when None a temporary folder of tiny_models(), removed afterwards."""
    if models is not None:
        yield models
        return
    with tempfile.TemporaryDirectory(prefix="nlstm-bench-") as tmp:
        yield tiny_models(Path(tmp))


async def pick_models(stub) -> tuple[str, str]:
    """(character model, glimpse classifier): the first of each that the server lists."""
    from serving.api.nlstm.v1 import inference_pb2 as pb

    listed = (await stub.ListModels(pb.ListModelsRequest())).models
    chars = [m.name for m in listed if m.vocab_size]
    glimpses = [m.name for m in listed if m.num_classes]
    if not chars or not glimpses:
        raise SystemExit(
            f"the server runs {[m.name for m in listed]}; this needs a character model and a "
            "glimpse classifier (--tiny exports a random character model beside the bundled "
            "mnist-nlstm)"
        )
    return chars[0], glimpses[0]


def glimpse_requests(rng: np.random.Generator, model: str = "", session_id: str = "") -> list:
    """The 20 GlimpseRequests of one random MNIST-like image (about a fifth of the pixels lit,
    as in MNIST); model and session_id go on the first."""
    from serving.api.nlstm.v1 import inference_pb2 as pb
    from serving.formats import image_to_glimpses

    image = ((rng.random((28, 28)) < 0.2) * rng.integers(64, 256, (28, 28))).astype(np.uint8)
    return [
        pb.GlimpseRequest(
            model=model if i == 0 else "",
            session_id=session_id if i == 0 else "",
            pixels=g.tolist(),
        )
        for i, g in enumerate(image_to_glimpses(image))
    ]
