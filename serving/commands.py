"""What the `nlstm generate|score|classify|session` commands print, over the client library
(serving.client.Client) for a running server, and their local backends (`--backend onnx`: an
exported folder run here on onnxruntime, no server). No torch.

Each function takes plain arguments (the `nlstm` command parses the flags) and prints what a
person wants to see: generated text streamed as it arrives, bits per character, per-glimpse
predictions, session ids.
"""

from __future__ import annotations

import gzip
import math
import sys
from pathlib import Path

import numpy as np

from serving.client import Client, Glimpse, ScoreResult, SessionInfo, Snapshot

# What a command says when no server answers; generate and score add the local backend.
NO_SERVER_HINT = (
    "start one with `nlstm serve` (it serves the bundled models on port 50051) "
    "or pass --target HOST:PORT"
)
LOCAL_HINT = "; or run without a server: --backend onnx"


def connect(
    target: str,
    *,
    api_key: str | None = None,
    tls=None,
    timeout: float | None = None,
    local: bool = False,
) -> Client:
    """A Client whose server answered within `timeout` (10 s by default), else OSError saying
    how to start one (and, with `local`, that the command also runs without one)."""
    client = Client(target, api_key=api_key, tls=tls, timeout=timeout)
    try:
        client.wait_ready(timeout or 10)
    except OSError as exc:
        client.close()
        raise OSError(f"{exc}: {NO_SERVER_HINT}" + (LOCAL_HINT if local else "")) from None
    return client


def generate(
    client: Client,
    model: str,
    prompt: str,
    max_chars: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop: list[str],
    session_id: str,
    out=None,
) -> str:
    out = out or sys.stdout  # read now: a default bound at import would outlive a replaced stdout
    gen = client.generate(
        model,
        prompt,
        max_chars=max_chars,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stop,
        session_id=session_id,
    )
    for piece in gen:
        out.write(piece)
        out.flush()
    out.write("\n")
    return gen.text


def generate_local(
    models_dir: str,
    model: str,
    prompt: str,
    max_chars: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop: list[str],
    out=None,
    providers: str = "auto",
    threads: int | None = None,
) -> str:
    """`nlstm generate --backend onnx`: sample from the exported folder models_dir/model here on
    onnxruntime, no server. The same sequence logic as the server's Generate (start symbol,
    prompt, stop strings, end marker) and the same sampling arithmetic (serving.sampling.draw,
    alone or in a batch), so a seed gives the server's text for the same request."""
    from serving.calls import generate_sequence, id_texts
    from serving.formats import start_id
    from serving.limits import Limits
    from serving.requests import GenerateParams

    out = out or sys.stdout
    m = _local_model(models_dir, model, providers, threads)
    if max_chars < 1:
        raise ValueError(f"--max-chars must be >= 1, got {max_chars}")
    max_stop, max_stop_chars = (
        Limits().max_stop,
        Limits().max_stop_chars,
    )  # the server's default bounds
    if len(stop) > max_stop or any(not s for s in stop):
        raise ValueError(f"--stop takes at most {max_stop} non-empty strings")
    if any(len(s) > max_stop_chars for s in stop):
        raise ValueError(f"a --stop string has at most {max_stop_chars} characters")
    tok = m.tokenizer
    pieces: list[str] = []

    def emit(text, _bits, _reason, _made):
        if text:
            out.write(text)
            out.flush()
            pieces.append(text)

    # the request a server's Generate without a session would get: the same sequence, sampler and
    # seed
    params = GenerateParams(
        model, "", prompt, max_chars, temperature, top_k, top_p, seed, tuple(stop)
    )
    feed = [start_id(tok)] + [int(i) for i in tok.encode(prompt).ids]
    seq = generate_sequence(
        params, tok, id_texts(tok), m.initial_state(1)[0], None, feed, emit, boundaries=False
    )
    while not seq.finished:
        post: list = []
        if seq.wants_sample:
            seq.take_sample(seq.sampler(seq.prediction()), None, post)
        logits, state = m.step(np.array([seq.take_input()]), seq.pos[0][None])
        seq.advance(logits[0], state[0], post)
        for callback in post:
            callback()
    out.write("\n")
    return "".join(pieces)


def _local_model(models_dir: str, model: str, providers: str, threads: int | None):
    from serving.runtime import load_model

    if not model:
        raise ValueError("--model is required (a folder name under --models)")
    folder = Path(models_dir) / model
    if not (folder / "meta.json").is_file():
        raise ValueError(
            f"no exported model {model!r} under {models_dir} (a folder with a meta.json)"
        )
    m = load_model(folder, providers=providers, intra_op_threads=threads)
    if m.kind != "char":
        raise ValueError(
            f"model {model!r} is a {m.kind} model; this command runs on character models"
        )
    return m


def read_text(path: str) -> str:
    return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")


def print_score(
    text: str,
    num_chars: int,
    total_bits: float,
    bits_per_char: float,
    unknown_chars: int,
    bits,
    per_char: bool,
) -> None:
    print(
        f"{num_chars} characters, {total_bits:.1f} bits, {bits_per_char:.4f} bits/char"
        + (f", {unknown_chars} unknown" if unknown_chars else "")
    )
    if per_char:
        for ch, b in zip(text, bits, strict=True):  # one figure per character
            print(f"{ch!r}\t{b:.3f}")


def score_local(
    models_dir: str,
    model: str,
    path: str,
    per_char: bool,
    providers: str = "auto",
    threads: int | None = None,
):
    """`nlstm score --backend onnx`: the exported folder models_dir/model run here on
    onnxruntime, no server; the same figures as the server's Score without a session."""
    text = read_text(path)
    if not text:
        raise ValueError("the text to score is empty")
    r = _local_model(models_dir, model, providers, threads).score(text)
    print_score(
        text, r.chars, r.nats / math.log(2), r.bits_per_char, r.unknown_chars, r.bits, per_char
    )
    return r


def score(
    client: Client, model: str, path: str, per_char: bool, session_id: str = ""
) -> ScoreResult:
    text = read_text(path)
    r = client.score(model, text, per_char=per_char, session_id=session_id)
    print_score(text, r.num_chars, r.total_bits, r.bits_per_char, r.unknown_chars, r.bits, per_char)
    return r


def read_mnist_image(data_dir: str, index: int, split: str = "t10k") -> tuple[np.ndarray, int]:
    """One (28, 28) uint8 image and its label from the original IDX .gz files."""
    root = Path(data_dir) / "mnist"
    if not root.is_dir():
        root = Path(data_dir)
    for name in (f"{split}-images-idx3-ubyte.gz", f"{split}-labels-idx1-ubyte.gz"):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"no MNIST file {root / name}: `nlstm data download mnist --data-dir {data_dir}` "
                "fetches it, or pass --data-dir DIR where DIR/mnist/ holds the MNIST .gz files"
            )
    with gzip.open(root / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if not 0 <= index < len(images):
        raise ValueError(f"image index must be in [0, {len(images)}), got {index}")
    return images[index], int(labels[index])


def classify(
    client: Client, model: str, image: np.ndarray, label: int | None = None
) -> list[Glimpse]:
    out = []
    for g in client.classify_stream(model, image):
        out.append(g)
        print(f"glimpse {g.step:2d}: class {g.predicted_class} (p = {max(g.probabilities):.3f})")
    if label is not None:
        print(f"label: {label}")
    return out


# --------------------------------------------------------------------------------- sessions
def session_create(client: Client, model: str) -> SessionInfo:
    """`nlstm session create`: prints the new session's id alone (for `sid=$(...)`)."""
    s = client.session(model).info
    print(s.session_id)
    return s


def session_show(client: Client, session_id: str) -> SessionInfo:
    s = client.session_info(session_id)
    print(
        f"session: {s.session_id}\nmodel: {s.model}\nposition: {s.position}\n"
        f"idle timeout: {s.idle_timeout_seconds} s\nin use: {'yes' if s.in_use else 'no'}"
    )
    return s


def session_close(client: Client, session_id: str) -> None:
    client.attach(session_id).close()


def session_snapshot(client: Client, session_id: str, path: str) -> Snapshot:
    """`nlstm session snapshot`: the session's snapshot to `path` (written atomically; - for
    standard output), what it holds to standard error."""
    snap = client.attach(session_id).snapshot()
    if path == "-":
        sys.stdout.buffer.write(snap.data)
        sys.stdout.flush()
    else:
        snap.save(path)
    print(f"{len(snap.data)} bytes: model {snap.model}, position {snap.position}", file=sys.stderr)
    return snap


def session_restore(client: Client, path: str) -> SessionInfo:
    """`nlstm session restore`: a new session from a snapshot file (- for standard input);
    prints its id alone."""
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    s = client.restore(data).info
    print(s.session_id)
    return s


def session_fork(client: Client, session_id: str) -> SessionInfo:
    """`nlstm session fork`: a new session with a copy of the state; prints its id alone."""
    s = client.attach(session_id).fork().info
    print(s.session_id)
    return s
