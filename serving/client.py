"""Command-line clients of a running server: generate, score, classify (no torch); and their
local backends (`--backend onnx`: an exported folder run here on onnxruntime, no server).

Each function takes plain arguments (the `nlstm` command parses the flags) and prints what a
person wants to see: generated text streamed as it arrives, bits per character, per-glimpse
predictions.
"""

from __future__ import annotations

import gzip
import math
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from serving.api.nlstm.v1 import inference_pb2 as pb
from serving.api.nlstm.v1 import inference_pb2_grpc as pb_grpc
from serving.formats import image_to_glimpses

# What a client says when no server answers; generate and score add "or --backend onnx".
NO_SERVER_HINT = "start one with `nlstm serve` (it serves the bundled models on port 50051) or pass --target HOST:PORT"
LOCAL_HINT = "; or run without a server: --backend onnx"


@dataclass
class Connection:
    """How to reach a server: its address, TLS (the CA that signed its certificate; a client
    certificate and key for mutual TLS) and the API key sent with every call."""

    target: str
    tls_ca: str | Path | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    api_key: str | None = None

    def channel(self) -> grpc.Channel:
        if self.tls_ca is None:
            return grpc.insecure_channel(self.target)
        from serving.auth import channel_credentials

        return grpc.secure_channel(self.target, channel_credentials(self.tls_ca, self.tls_cert, self.tls_key))

    @property
    def metadata(self) -> list[tuple[str, str]]:
        from serving.auth import bearer

        return bearer(self.api_key)


def _stub(conn: Connection | str, timeout: float | None, local: bool = False):
    """A channel to the server once it is connected, its stub and the call metadata. A refused
    connection (no server listening) fails at once rather than after gRPC's reconnection
    backoff; a server that accepts but does not answer gets `timeout` (default 10 s). `local`:
    the command also has `--backend onnx`, which the error then suggests."""
    conn = Connection(conn) if isinstance(conn, str) else conn
    channel = conn.channel()
    settled = threading.Event()
    seen = []

    def watch(state: grpc.ChannelConnectivity) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                     grpc.ChannelConnectivity.SHUTDOWN):
            seen.append(state)
            settled.set()

    channel.subscribe(watch, try_to_connect=True)
    settled.wait(timeout or 10)
    channel.unsubscribe(watch)
    if not seen or seen[0] != grpc.ChannelConnectivity.READY:
        channel.close()
        if conn.tls_ca:
            why = "over TLS: check --tls-ca and the server's certificate, or whether it runs"
        elif seen:
            why = "the connection failed: nothing listens there"
        else:
            why = "no answer within the deadline"
        raise OSError(f"no nlstm server answers at {conn.target} ({why}): {NO_SERVER_HINT}"
                      + (LOCAL_HINT if local else ""))
    return channel, pb_grpc.InferenceStub(channel), conn.metadata


def _rpc_error(exc: grpc.RpcError) -> ValueError:
    return ValueError(f"{exc.code().name}: {exc.details()}")


def generate(target: Connection | str, model: str, prompt: str, max_chars: int, temperature: float, top_k: int,
             top_p: float, seed: int | None, stop: list[str], session_id: str, out=None,
             timeout: float | None = None) -> str:
    out = out or sys.stdout  # looked up per call: a default bound at import goes stale
    channel, stub, metadata = _stub(target, timeout, local=True)
    request = pb.GenerateRequest(model=model, session_id=session_id, prompt=prompt, max_chars=max_chars,
                                 temperature=temperature, top_k=top_k, top_p=top_p, stop=stop)
    if seed is not None:
        request.seed = seed
    text = []
    try:
        for response in stub.Generate(request, timeout=timeout, metadata=metadata):
            out.write(response.text)
            out.flush()
            text.append(response.text)
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from None
    finally:
        channel.close()
    out.write("\n")
    return "".join(text)


def generate_local(models_dir: str, model: str, prompt: str, max_chars: int, temperature: float, top_k: int,
                   top_p: float, seed: int | None, stop: list[str], out=None, providers: str = "auto",
                   threads: int | None = None) -> str:
    """`nlstm generate --backend onnx`: sample from the exported folder models_dir/model here on
    onnxruntime, no server. The same sequence logic as the server's Generate (start symbol,
    prompt, stop strings, end marker) and the same sampling arithmetic (serving.sampling.draw,
    alone or in a batch), so a seed gives the server's text for the same request."""
    from serving.engine import Limits, banned_ids, id_texts
    from serving.formats import start_id
    from serving.sampling import Sampler
    from serving.scheduler import GenerateSequence

    out = out or sys.stdout
    m = _local_model(models_dir, model, providers, threads)
    if not 1 <= max_chars:
        raise ValueError(f"--max-chars must be >= 1, got {max_chars}")
    max_stop, max_stop_chars = Limits().max_stop, Limits().max_stop_chars  # the server's default bounds
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

    feed = [start_id(tok)] + [int(i) for i in tok.encode(prompt).ids]
    seq = GenerateSequence(m.initial_state(1)[0], None, feed, Sampler(temperature, top_k, top_p, seed, banned_ids(tok)),
                           max_chars, stop, False, id_texts(tok), tok.eos_id, emit, boundaries=False)
    while not seq.finished:
        post: list = []
        if seq.wants_sample:
            seq.take_sample(seq.sampler(seq.pos[1]), None, post)
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
        raise ValueError(f"no exported model {model!r} under {models_dir} (a folder with a meta.json)")
    m = load_model(folder, providers=providers, intra_op_threads=threads)
    if m.kind != "char":
        raise ValueError(f"model {model!r} is a {m.kind} model; this command runs on character models")
    return m


def read_text(path: str) -> str:
    return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")


def print_score(text: str, num_chars: int, total_bits: float, bits_per_char: float, unknown_chars: int,
                bits, per_char: bool) -> None:
    print(f"{num_chars} characters, {total_bits:.1f} bits, {bits_per_char:.4f} bits/char"
          + (f", {unknown_chars} unknown" if unknown_chars else ""))
    if per_char:
        for ch, b in zip(text, bits):
            print(f"{ch!r}\t{b:.3f}")


def score_local(models_dir: str, model: str, path: str, per_char: bool, providers: str = "auto",
                threads: int | None = None):
    """`nlstm score --backend onnx`: the exported folder models_dir/model run here on
    onnxruntime, no server; the same figures as the server's Score without a session."""
    text = read_text(path)
    if not text:
        raise ValueError("the text to score is empty")
    r = _local_model(models_dir, model, providers, threads).score(text)
    print_score(text, r.chars, r.nats / math.log(2), r.bits_per_char, r.unknown_chars, r.bits, per_char)
    return r


def score(target: Connection | str, model: str, path: str, per_char: bool, session_id: str = "",
          timeout: float | None = None) -> pb.ScoreResponse:
    text = read_text(path)
    channel, stub, metadata = _stub(target, timeout, local=True)
    try:
        r = stub.Score(pb.ScoreRequest(model=model, session_id=session_id, text=text, per_char=per_char),
                       timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from None
    finally:
        channel.close()
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
                f"no MNIST file {root / name}: `nlstm data download mnist --data-dir {data_dir}` fetches "
                "it, or pass --data-dir DIR where DIR/mnist/ holds the MNIST .gz files"
            )
    with gzip.open(root / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if not 0 <= index < len(images):
        raise ValueError(f"image index must be in [0, {len(images)}), got {index}")
    return images[index], int(labels[index])


def classify(target: Connection | str, model: str, image: np.ndarray, label: int | None = None,
             timeout: float | None = None) -> list[pb.GlimpseResponse]:
    glimpses = image_to_glimpses(image)  # (20, 49)
    channel, stub, metadata = _stub(target, timeout)

    def requests():
        for i, g in enumerate(glimpses):
            yield pb.GlimpseRequest(model=model if i == 0 else "", pixels=g.tolist())

    out = []
    try:
        for r in stub.ClassifyGlimpses(requests(), timeout=timeout, metadata=metadata):
            out.append(r)
            print(f"glimpse {r.step:2d}: class {r.predicted_class} (p = {max(r.probabilities):.3f})")
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from None
    finally:
        channel.close()
    if label is not None:
        print(f"label: {label}")
    return out


# --------------------------------------------------------------------------------- sessions
def _session_call(target: str, timeout: float | None, method: str, request):
    channel, stub, metadata = _stub(target, timeout)  # _stub returns the call metadata too
    try:
        return getattr(stub, method)(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        raise _rpc_error(exc) from None
    finally:
        channel.close()


def session_create(target: str, model: str, timeout: float | None = None) -> pb.Session:
    """`nlstm session create`: prints the new session's id alone (for `sid=$(...)`)."""
    s = _session_call(target, timeout, "CreateSession", pb.CreateSessionRequest(model=model))
    print(s.session_id)
    return s


def session_show(target: str, session_id: str, timeout: float | None = None) -> pb.Session:
    s = _session_call(target, timeout, "GetSession", pb.GetSessionRequest(session_id=session_id))
    print(f"session: {s.session_id}\nmodel: {s.model}\nposition: {s.position}\n"
          f"idle timeout: {s.idle_timeout_seconds} s\nin use: {'yes' if s.in_use else 'no'}")
    return s


def session_close(target: str, session_id: str, timeout: float | None = None) -> None:
    _session_call(target, timeout, "CloseSession", pb.CloseSessionRequest(session_id=session_id))


def session_snapshot(target: str, session_id: str, path: str, timeout: float | None = None) -> pb.SessionSnapshot:
    """`nlstm session snapshot`: the session's snapshot to `path` (written atomically; - for
    standard output), what it holds to standard error."""
    snap = _session_call(target, timeout, "SnapshotSession", pb.SnapshotSessionRequest(session_id=session_id))
    if path == "-":
        sys.stdout.buffer.write(snap.data)
        sys.stdout.flush()
    else:
        out = Path(path)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_bytes(snap.data)
        tmp.replace(out)  # atomic: a reader never sees half a snapshot
    print(f"{len(snap.data)} bytes: model {snap.model}, position {snap.position}", file=sys.stderr)
    return snap


def session_restore(target: str, path: str, timeout: float | None = None) -> pb.Session:
    """`nlstm session restore`: a new session from a snapshot file (- for standard input);
    prints its id alone."""
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    s = _session_call(target, timeout, "RestoreSession", pb.RestoreSessionRequest(data=data))
    print(s.session_id)
    return s


def session_fork(target: str, session_id: str, timeout: float | None = None) -> pb.Session:
    """`nlstm session fork`: a new session with a copy of the state; prints its id alone."""
    s = _session_call(target, timeout, "ForkSession", pb.ForkSessionRequest(session_id=session_id))
    print(s.session_id)
    return s
