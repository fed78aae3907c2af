"""The `nlstm` command: the one place where flags are parsed.

Every subcommand imports its implementation lazily inside its handler, so that `nlstm serve`
(and the other serving clients) run in a process that never loads torch: onnxruntime shares the
CPU badly with torch's thread pools, and neither the serving image nor the base install
(`pip install nlstm`) carries torch at all. The commands that need torch (train, export, params,
plot, visualize: the `train` extra) name the modules they need (`needs`), and `main` says what to
install when one is missing instead of failing with an import traceback.
Everything below this module takes plain arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

# What to do when a command of the `train` extra runs in the base (serving) install.
TRAIN_EXTRA_HINT = (
    "install the training extra: pip install 'nlstm[train]' (in a checkout: pip install -e "
    "'.[train]'); on a machine without a GPU install the CPU build of torch first, or pip "
    "fetches the multi-GB CUDA one: pip install torch --index-url https://download.pytorch.org/whl/cpu"
)
TRAIN_EXTRA_MODULES = ("torch", "onnx", "onnxscript", "matplotlib")


# --------------------------------------------------------------------------------------- params
def _add_params(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "params",
        help="print the parameter counts of every model in the paper's Tables 1-4 and the HM-LSTM",
        description=(
            "Instantiate every model of the paper's Tables 1-4 and the HM-LSTM baseline's PTB "
            "model (3x500) and print task, model, n, cell size and trainable parameters beside "
            "the paper's Params column ('-' where the paper gives none)."
        ),
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    p.add_argument(
        "--poems-vocab",
        type=int,
        default=None,
        help="vocabulary size of the poems task (default: 5367, what the paper's counts imply)",
    )
    p.set_defaults(handler=_run_params, needs=("torch",))


def _run_params(args: argparse.Namespace) -> int:
    import json

    from training.paper import PAPER_POEMS_VOCAB, paper_rows

    rows = paper_rows(poems_vocab=args.poems_vocab or PAPER_POEMS_VOCAB)
    if args.json:
        for r in rows:
            print(json.dumps(r.as_dict()))
        return 0
    header = f"{'task':<8} {'model':<7} {'n':>2} {'cell':>5} {'params':>12} {'paper':>7}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.task:<8} {r.model:<7} {r.n:>2} {r.cell_size:>5} {r.params:>12,} "
            f"{r.paper_params or '-':>7}  {r.note}"
        )
    return 0


# ----------------------------------------------------------------------------------------- data
def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="download, verify and prepare the paper's datasets")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{prepare,download}")
    for name, help_ in (
        ("prepare", "download (if missing), verify, tokenize and cache a task's data"),
        ("download", "download and verify a task's raw files only"),
    ):
        q = dsub.add_parser(name, help=help_)
        q.add_argument("task", help="ptb, text8, poems or mnist")
        q.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help=(
                "where the raw files live, as DIR/TASK/FILE; may be read-only when complete "
                "(default: $NLSTM_DATA_DIR, else ~/.cache/nlstm/raw)"
            ),
        )
        if name == "prepare":
            q.add_argument(
                "--cache-dir",
                type=Path,
                default=None,
                help=(
                    "where prepared (tokenized, memory-mapped) data is cached "
                    "(default: $NLSTM_CACHE_DIR, else ~/.cache/nlstm/prepared)"
                ),
            )
            q.add_argument("--force", action="store_true", help="prepare again even if a cache exists")
    p.set_defaults(handler=_run_data)


def _run_data(args: argparse.Namespace) -> int:
    from training import data

    if args.data_command == "download":
        paths = data.download(args.task, data_dir=args.data_dir)
        for path in paths:
            print(path)
        return 0
    summary = data.prepare(
        args.task, data_dir=args.data_dir, force=args.force, cache_dir=args.cache_dir
    )
    print(summary)
    return 0


# ---------------------------------------------------------------------------- serving (no torch)
def _env(name: str, default, cast=str):
    """A flag's default from the environment variable NLSTM_<NAME>, else `default`."""
    value = os.environ.get(f"NLSTM_{name}")
    if value is None or value == "":
        return default
    try:
        return cast(value)
    except ValueError:
        raise SystemExit(f"nlstm: environment variable NLSTM_{name}={value!r} is not a valid {cast.__name__}")


def _default_models_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "exported"


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve exported models over gRPC (stateful Generate, Score, ClassifyGlimpses)",
        description=(
            "Load every exported model folder under --models and serve them over gRPC, with "
            "health checking, reflection and Prometheus metrics. Every flag can also be set by "
            "the environment variable in brackets. SIGTERM drains: health turns NOT_SERVING, "
            "new calls get UNAVAILABLE, calls in flight get --grace seconds."
        ),
    )
    a = p.add_argument
    a("--models", type=Path, default=_env("MODELS", _default_models_dir(), Path),
      help="folder of exported models, one per sub-folder; a model's name is its folder's [NLSTM_MODELS] "
           "(default: the bundled exported/)")
    a("--host", default=_env("HOST", "[::]"), help="address to bind [NLSTM_HOST] (default: all)")
    a("--port", type=int, default=_env("PORT", 50051, int),
      help="gRPC port; 0 picks a free one and logs it [NLSTM_PORT] (default: 50051)")
    a("--http-port", type=int, default=_env("HTTP_PORT", None, int),
      help="also serve HTTP/JSON (the KServe v2 routes, docs/http.md) and the playground page on this port, "
           "bound to --host; off unless set [NLSTM_HTTP_PORT]")
    a("--metrics-port", type=int, default=_env("METRICS_PORT", 9090, int),
      help="Prometheus /metrics HTTP port; -1 turns it off [NLSTM_METRICS_PORT] (default: 9090)")
    a("--metrics-host", default=_env("METRICS_HOST", None),
      help="address the metrics endpoint binds (it has no authentication) [NLSTM_METRICS_HOST] (default: --host)")
    a("--max-sessions", type=int, default=_env("MAX_SESSIONS", 1024, int),
      help="sessions held at once; more get RESOURCE_EXHAUSTED [NLSTM_MAX_SESSIONS] (default: 1024)")
    a("--max-sessions-per-client", type=int, default=_env("MAX_SESSIONS_PER_CLIENT", 0, int),
      help="sessions one client (its API key, or its address without --api-keys-file) may hold; 0: no bound "
           "[NLSTM_MAX_SESSIONS_PER_CLIENT] (default: 0)")
    a("--max-client-requests-per-s", type=float, default=_env("MAX_CLIENT_REQUESTS_PER_S", 0.0, float),
      help="calls per second one client may start, in bursts of twice that; more get RESOURCE_EXHAUSTED; 0: no "
           "limit [NLSTM_MAX_CLIENT_REQUESTS_PER_S] (default: 0)")
    a("--idle-timeout", type=float, default=_env("IDLE_TIMEOUT", 600.0, float),
      help="seconds after which an unused session is freed, 1 to 31536000 [NLSTM_IDLE_TIMEOUT] (default: 600)")
    a("--max-batch", type=int, default=_env("MAX_BATCH", 64, int),
      help="sequences advanced together in one step [NLSTM_MAX_BATCH] (default: 64)")
    a("--max-wait-ms", type=float, default=_env("MAX_WAIT_MS", 2.0, float),
      help="how long the oldest waiting step waits to fill a batch, 0 to 1000 [NLSTM_MAX_WAIT_MS] (default: 2)")
    a("--stream-interval-ms", type=float, default=_env("STREAM_INTERVAL_MS", 50.0, float),
      help="Generate: the least time between two messages of a stream, each carrying every character "
           "made meanwhile (the first is sent at once); 0 sends each as it is made, within "
           "--max-messages-per-s [NLSTM_STREAM_INTERVAL_MS] (default: 50)")
    a("--max-messages-per-s", type=float, default=_env("MAX_MESSAGES_PER_S", 400.0, float),
      help="Generate: the most messages per second all of one model's streams send together; with N "
           "streams each stream's messages are at least N / this seconds apart (at most 10 s) when that is "
           "longer than --stream-interval-ms (400: 50 ms up to 20 streams, 160 ms at 64); 0 turns the budget off "
           "[NLSTM_MAX_MESSAGES_PER_S] (default: 400)")
    a("--max-chars", type=int, default=_env("MAX_CHARS", 4096, int),
      help="most characters one Generate may ask for [NLSTM_MAX_CHARS] (default: 4096)")
    a("--max-text", type=int, default=_env("MAX_TEXT", 100_000, int),
      help="longest Score text or prompt in characters [NLSTM_MAX_TEXT] (default: 100000)")
    a("--max-stop-chars", type=int, default=_env("MAX_STOP_CHARS", 256, int),
      help="longest Generate stop string in characters [NLSTM_MAX_STOP_CHARS] (default: 256)")
    a("--max-glimpses", type=int, default=_env("MAX_GLIMPSES", 4096, int),
      help="glimpses one ClassifyGlimpses stream may send [NLSTM_MAX_GLIMPSES] (default: 4096)")
    a("--max-request-bytes", type=int, default=_env("MAX_REQUEST_BYTES", 0, int),
      help="largest request message in bytes after decompression; 0 sizes it from --max-text and the stop "
           "limits (4 bytes a character + 16 KiB) [NLSTM_MAX_REQUEST_BYTES] (default: 0)")
    a("--max-inflight-bytes", type=int, default=_env("MAX_INFLIGHT_BYTES", 64 << 20, int),
      help="bytes of request messages all running calls together may hold; more get RESOURCE_EXHAUSTED "
           "[NLSTM_MAX_INFLIGHT_BYTES] (default: 67108864)")
    a("--max-concurrent-calls", type=int, default=_env("MAX_CONCURRENT_CALLS", 4096, int),
      help="calls running at once; more get RESOURCE_EXHAUSTED before their request is read "
           "[NLSTM_MAX_CONCURRENT_CALLS] (default: 4096)")
    a("--tls-cert", type=Path, default=_env("TLS_CERT", None, Path),
      help="PEM certificate chain: serve over TLS (with --tls-key) [NLSTM_TLS_CERT]")
    a("--tls-key", type=Path, default=_env("TLS_KEY", None, Path), help="PEM private key of --tls-cert [NLSTM_TLS_KEY]")
    a("--tls-client-ca", type=Path, default=_env("TLS_CLIENT_CA", None, Path),
      help="PEM CA: mutual TLS, every client must present a certificate it signed [NLSTM_TLS_CLIENT_CA]")
    a("--api-keys-file", type=Path, default=_env("API_KEYS_FILE", None, Path),
      help="file of API keys, one a line: every call but health checks must send 'authorization: Bearer KEY', "
           "and sessions belong to the key that created them [NLSTM_API_KEYS_FILE]")
    a("--prefix-cache-mb", type=int, default=_env("PREFIX_CACHE_MB", 64, int),
      help="MiB of prompt-prefix states kept so that calls sharing a prompt's opening skip its prefill "
           "(docs/serving.md); 0 turns the cache off [NLSTM_PREFIX_CACHE_MB] (default: 64)")
    a("--grace", type=float, default=_env("GRACE", 10.0, float),
      help="seconds calls in flight get to finish on SIGTERM [NLSTM_GRACE] (default: 10)")
    a("--threads", type=int, default=_env("THREADS", 0, int),
      help="onnxruntime intra-op threads per model; 0 lets onnxruntime choose [NLSTM_THREADS]")
    a("--providers", default=_env("PROVIDERS", "auto"),
      help="onnxruntime providers: auto (CUDA when a session gets it, else CPU), cpu or cuda [NLSTM_PROVIDERS]")
    a("--snapshot-key-file", type=Path, default=_env("SNAPSHOT_KEY_FILE", None, Path),
      help="file holding a secret of at least 16 bytes (e.g. `openssl rand -hex 32`; surrounding whitespace "
           "is ignored): SnapshotSession signs snapshots with it (HMAC-SHA256) and RestoreSession refuses "
           "snapshots it did not sign [NLSTM_SNAPSHOT_KEY_FILE] (default: none, snapshots are checksummed only)")
    a("--session-store", default=_env("SESSION_STORE", "memory"),
      help="where sessions live: memory (this process), file:DIR (survives a restart on the same DIR) or "
           "redis://HOST:PORT/DB (shared by replicas: any replica serves any session) [NLSTM_SESSION_STORE] "
           "(default: memory)")
    a("--session-checkpoint-s", type=float, default=_env("SESSION_CHECKPOINT_S", 2.0, float),
      help="file or Redis store: how often a running call writes its session and renews its lease (a dead "
           "replica's sessions are free again after 3 of these, at least 2 s) [NLSTM_SESSION_CHECKPOINT_S] (default: 2)")
    a("--log-level", default=_env("LOG_LEVEL", "INFO"), help="logging level [NLSTM_LOG_LEVEL]")
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from serving.auth import ApiKeys, server_credentials
    from serving.engine import Limits
    from serving.limits import ServerLimits
    from serving.server import serve
    from serving.settings import check_serve_settings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    check_serve_settings(vars(args))  # every numeric flag in its range, or one clear error
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    tls = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    keys = ApiKeys.from_file(args.api_keys_file) if args.api_keys_file else None
    limits = Limits(max_chars=args.max_chars, max_text=args.max_text, max_sessions=args.max_sessions,
                    idle_timeout=args.idle_timeout, max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000,
                    stream_interval=args.stream_interval_ms / 1000, max_messages_per_s=args.max_messages_per_s,
                    max_stop_chars=args.max_stop_chars, max_glimpses=args.max_glimpses,
                    max_sessions_per_client=args.max_sessions_per_client, prefix_cache_mb=args.prefix_cache_mb,
                    checkpoint_interval=args.session_checkpoint_s)
    server_limits = ServerLimits(max_request_bytes=args.max_request_bytes, max_inflight_bytes=args.max_inflight_bytes,
                                 max_concurrent_calls=args.max_concurrent_calls,
                                 max_client_requests_per_s=args.max_client_requests_per_s)
    runtime = {"providers": args.providers, "intra_op_threads": args.threads or None}
    snapshot_key = _read_snapshot_key(args.snapshot_key_file) if args.snapshot_key_file else None
    asyncio.run(serve(args.models, port=args.port, host=args.host,
                      metrics_port=None if args.metrics_port < 0 else args.metrics_port, metrics_host=args.metrics_host,
                      limits=limits, grace=args.grace, runtime_options=runtime, server_limits=server_limits,
                      api_keys=keys, tls=tls, snapshot_key=snapshot_key, session_store=args.session_store,
                      http_port=args.http_port,
                      http_ssl=_http_ssl(args) if args.http_port is not None else None))
    return 0


def _http_ssl(args: argparse.Namespace):
    """HTTPS on --http-port with gRPC's --tls-cert/--tls-key (and --tls-client-ca), if given."""
    if args.tls_cert is None:
        return None
    from serving.http import ssl_context

    return ssl_context(args.tls_cert, args.tls_key, args.tls_client_ca)


def _read_snapshot_key(path: Path) -> bytes:
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise OSError(f"--snapshot-key-file: cannot read {path}: {exc.strerror}") from None
    if len(key) < 16:
        raise ValueError(f"--snapshot-key-file: {path} holds {len(key)} bytes; a snapshot key needs at least 16 "
                         f"(e.g. `openssl rand -hex 32 > {path}`)")
    return key


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="",
                   help="model name: a folder under the server's --models (bundled: ptb-nlstm, poems-nlstm, "
                        "mnist-nlstm); needed without --session")
    p.add_argument("--session", default="", help="continue an existing session's state (default: none, "
                                                 "a fresh state)")
    _add_connection_flags(p)


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=_env("TARGET", "localhost:50051"),
                   help="server address host:port [NLSTM_TARGET] (default: localhost:50051)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds (default: none)")
    p.add_argument("--api-key", default=_env("API_KEY", None),
                   help="API key of a server with --api-keys-file, sent as 'authorization: Bearer KEY' [NLSTM_API_KEY]")
    p.add_argument("--tls-ca", type=Path, default=_env("TLS_CA", None, Path),
                   help="connect over TLS, trusting the server certificate this PEM CA signed [NLSTM_TLS_CA]")
    p.add_argument("--tls-client-cert", type=Path, default=_env("TLS_CLIENT_CERT", None, Path),
                   help="PEM certificate for a server with mutual TLS (with --tls-client-key, needs --tls-ca) "
                        "[NLSTM_TLS_CLIENT_CERT]")
    p.add_argument("--tls-client-key", type=Path, default=_env("TLS_CLIENT_KEY", None, Path),
                   help="PEM private key of --tls-client-cert [NLSTM_TLS_CLIENT_KEY]")


def _add_backend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("server", "onnx"), default="server",
                   help="server: a running nlstm serve (--target); onnx: the exported folder --models/--model, "
                        "run here on onnxruntime (no server, no torch) (default: server)")
    p.add_argument("--models", type=Path, default=_env("MODELS", _default_models_dir(), Path),
                   help="--backend onnx: folder of exported models [NLSTM_MODELS] (default: the bundled exported/)")
    p.add_argument("--providers", default=_env("PROVIDERS", "auto"), choices=("auto", "cpu", "cuda"),
                   help="--backend onnx: onnxruntime providers [NLSTM_PROVIDERS] (default: auto)")
    p.add_argument("--threads", type=int, default=0,
                   help="--backend onnx: onnxruntime intra-op threads; 0 lets onnxruntime choose (default: 0)")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="sample text from a running server (or a local exported model), streamed as it arrives",
        description="Sample text from a character model and print it as it arrives: after the start symbol "
                    "and --prompt, up to --max-chars characters, stopping early at the model's end marker or a "
                    "--stop text. --backend server (the default) asks a running `nlstm serve` (--target); "
                    "--backend onnx runs the exported folder --models/--model here on onnxruntime (no server, "
                    "no torch), with the same sampling, so the same --seed gives the same text.",
    )
    _add_client_flags(p)
    p.add_argument("--prompt", default="", help="text fed to the model first (default: none)")
    p.add_argument("--max-chars", type=int, default=200, help="most characters to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits before sampling; 0 = greedy (default: 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest only; 0 = off (default: 0)")
    p.add_argument("--top-p", type=float, default=0.0,
                   help="sample among the likeliest characters holding probability P; 0 or 1 = off (default: 0)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed: the same seed and request give the same text (default: a random one)")
    p.add_argument("--stop", action="append", default=[],
                   help="stop after this text (repeatable, at most 4; default: none)")
    _add_backend_flags(p)
    p.set_defaults(handler=lambda a: _client("generate", a))


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help="bits per character of a text file under a served (or a local exported) model",
        description="Bits per character of a text file, every character scored from a fresh state "
                    "(or from --session's). --backend server asks a running server's Score; "
                    "--backend onnx runs the exported folder --models/--model here on onnxruntime "
                    "(no server, no torch) and prints the same figures.",
    )
    p.add_argument("file", help="UTF-8 text file, or - for standard input")
    _add_client_flags(p)
    p.add_argument("--per-char", action="store_true", help="print each character's bits too (default: off)")
    _add_backend_flags(p)
    p.set_defaults(handler=lambda a: _client("score", a))


def _add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify", help="stream an MNIST image's 20 glimpses to a served classifier",
        description="Cut MNIST test image --index into the paper's 20 glimpses of 7x7 pixels, stream them to "
                    "a running server's ClassifyGlimpses (--target) and print the predicted class after each "
                    "glimpse, then the true label. The test images come from `nlstm data download mnist`.",
    )
    _add_client_flags(p)
    p.add_argument("--index", type=int, default=0, help="which test image, 0 to 9999 (default: 0)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with mnist/t10k-images-idx3-ubyte.gz, where `nlstm data download mnist` puts it "
                        "(default: the same as nlstm data's: $NLSTM_DATA_DIR, else ~/.cache/nlstm/raw)")
    p.set_defaults(handler=lambda a: _client("classify", a))


def _add_session(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "session", help="create, show, close, snapshot, restore or fork a session on a running server",
        description="Sessions hold a sequence's state on the server between calls (use the id with "
                    "generate/score --session). create, restore and fork print the new session's id alone; "
                    "snapshot writes the state to a file that restore turns into a new session, on this "
                    "server or any other running the same export of the model.",
    )
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_: str) -> argparse.ArgumentParser:
        q = ssub.add_parser(name, help=help_)
        _add_connection_flags(q)
        q.set_defaults(handler=_run_session)
        return q

    action("create", "a new session on --model").add_argument("--model", required=True, help="model name")
    action("show", "a session's model, position, idle timeout").add_argument("session_id")
    action("close", "free a session").add_argument("session_id")
    q = action("snapshot", "write a session's state to a file")
    q.add_argument("session_id")
    q.add_argument("--out", required=True, help="file to write (atomically), or - for standard output")
    action("restore", "a new session from a snapshot file").add_argument(
        "file", help="a file written by `nlstm session snapshot`, or - for standard input")
    action("fork", "a new session with a copy of a session's state").add_argument("session_id")


def _connect(args: argparse.Namespace, local: bool = False):
    """A serving.client.Client for the connection flags, once the server answers."""
    from serving.client import TLS
    from serving.commands import connect

    if (args.tls_client_cert or args.tls_client_key) and not args.tls_ca:
        raise ValueError("--tls-client-cert and --tls-client-key need --tls-ca (mutual TLS is TLS first)")
    tls = TLS(args.tls_ca, args.tls_client_cert, args.tls_client_key) if args.tls_ca else None
    return connect(args.target, api_key=args.api_key, tls=tls, timeout=args.timeout, local=local)


@contextlib.contextmanager
def _server_errors(server_error: type):
    """A call the server refused ends the command like bad input: 'CODE: message', exit 2."""
    try:
        yield
    except server_error as exc:
        raise ValueError(str(exc)) from None


def _run_session(args: argparse.Namespace) -> int:
    from serving import commands
    from serving.client import ServerError

    with _connect(args) as client, _server_errors(ServerError):
        if args.action == "create":
            commands.session_create(client, args.model)
        elif args.action == "show":
            commands.session_show(client, args.session_id)
        elif args.action == "close":
            commands.session_close(client, args.session_id)
        elif args.action == "snapshot":
            commands.session_snapshot(client, args.session_id, args.out)
        elif args.action == "restore":
            commands.session_restore(client, args.file)
        else:
            commands.session_fork(client, args.session_id)
    return 0


def _client(command: str, args: argparse.Namespace) -> int:
    from serving import commands

    if command in ("generate", "score") and args.backend == "onnx" and args.session:
        raise ValueError("--session needs --backend server: sessions live in a server")
    if command == "generate" and args.backend == "onnx":
        commands.generate_local(str(args.models), args.model, args.prompt, args.max_chars, args.temperature,
                                args.top_k, args.top_p, args.seed, args.stop, providers=args.providers,
                                threads=args.threads or None)
    elif command == "score" and args.backend == "onnx":
        commands.score_local(str(args.models), args.model, args.file, args.per_char, args.providers,
                             args.threads or None)
    else:
        from serving.client import ServerError

        if command == "classify":  # the image first: a missing file is reported without a server
            from training.data.fetch import default_data_dir  # where `nlstm data download mnist` puts it

            image, label = commands.read_mnist_image(str(args.data_dir or default_data_dir()), args.index)
        with _connect(args, local=command != "classify") as client, _server_errors(ServerError):
            if command == "generate":
                commands.generate(client, args.model, args.prompt, args.max_chars, args.temperature, args.top_k,
                                  args.top_p, args.seed, args.stop, args.session)
            elif command == "score":
                commands.score(client, args.model, args.file, args.per_char, args.session)
            else:
                commands.classify(client, args.model, image, label)
    return 0


# ---------------------------------------------------------------------------------------- train
class _IntermixedParser(argparse.ArgumentParser):
    """Accepts options and positionals in any order (`CONFIG --run-dir D key=value ...`).

    Plain argparse cannot give a `*` positional the words that follow an option once an earlier
    positional (CONFIG) has been matched; parse_known_intermixed_args can, and calls back into
    parse_known_args, hence the guard."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False
        flags = [a for a in extras if a.startswith("-")]
        if flags:  # here, with this command's usage, not the top-level parser's
            self.error(_unknown_flags_message(flags, list(sys.argv[1:] if args is None else args)))
        return namespace, extras


def _unknown_flags_message(flags: list[str], args: list[str]) -> str:
    """`--epochs 1` where `epochs=1` was meant: name the override to write instead."""
    from training.config import allowed_keys, nearest_key

    hints = []
    for flag in flags:
        name, eq, value = flag.lstrip("-").partition("=")
        key = name.replace("-", "_")
        key = key if key in allowed_keys() else nearest_key(key)
        if key is None:
            continue
        if not eq:
            i = args.index(flag) if flag in args else -1
            value = args[i + 1] if 0 <= i < len(args) - 1 and not args[i + 1].startswith("-") else "VALUE"
        hints.append(f"{key}={value}")
    message = f"unrecognized arguments: {' '.join(flags)}"
    if hints:
        message += (f"; config values are overrides written key=value, not --options: did you mean "
                    f"{' '.join(hints)}?")
    return message


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a config file (one per row of the paper's tables)",
        description=(
            "Train the model of CONFIG (a TOML file, e.g. configs/ptb-nlstm-2x600.toml) in "
            "--run-dir: metrics.jsonl, last.pt and best.pt. Any config value can be overridden "
            "as key=value (dotted for nested keys: model.hidden_size=128 optimizer.lr=0.001). "
            "Several processes: torchrun --nproc_per_node=N -m training.cli train ..."
        ),
    )
    p.__class__ = _IntermixedParser  # options and key=value overrides in any order
    p.add_argument("config", type=Path, help="TOML config file")
    p.add_argument("--run-dir", type=Path, required=True, help="folder for metrics and checkpoints")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its last.pt (starts it when there is none)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after N optimizer steps in all (evaluates and checkpoints first); sets max_steps",
    )
    p.add_argument(
        "--progress",
        choices=("auto", "on", "off"),
        default="auto",
        help="progress bar on stderr (auto: only when stderr is a terminal)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. epochs=1 optimizer.lr=0.001 (not --epochs 1)")
    p.set_defaults(handler=_run_train, needs=("torch",))


def _run_train(args: argparse.Namespace) -> int:
    # The config and the run folder are checked before torch, the data or the model load
    # (seconds), so that a typo or a taken --run-dir is reported at once.
    from training.config import load_config
    from training.run_folder import refuse_existing_run

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    config = load_config(args.config, overrides)
    if not args.resume:
        refuse_existing_run(args.run_dir)
    progress = {"auto": None, "on": True, "off": False}[args.progress]
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, one message
    started = time.monotonic()

    from training.trainer import train

    try:
        summary = train(config, args.run_dir, resume=args.resume, progress=progress)
    except KeyboardInterrupt as exc:
        if main_rank:
            print(_interrupted_message(args, config, getattr(exc, "step", None), getattr(exc, "saved_step", None)),
                  file=sys.stderr)
        return 130
    if main_rank:
        print(_summary_line(summary, time.monotonic() - started))
    return 0


def _resume_command(args: argparse.Namespace) -> str:
    words = ["nlstm", "train", str(args.config), "--run-dir", str(args.run_dir), "--resume"]
    if args.max_steps is not None:
        words += ["--max-steps", str(args.max_steps)]
    return shlex.join(words + list(args.overrides))


def _interrupted_message(args: argparse.Namespace, config, step: int | None, saved_step: int | None) -> str:
    """What Ctrl-C left behind and the command that continues the run."""
    from training.run_folder import LAST

    last = args.run_dir / LAST
    where = f"interrupted at step {step}" if step is not None else "interrupted before training started"
    when = (f"written at each evaluation and every checkpoint_every={config.checkpoint_every} steps"
            if config.checkpoint_every else "written at each evaluation")
    if saved_step is not None:
        saved = f"{last} holds step {saved_step} ({when})"
    elif last.exists():
        saved = f"{last} is unchanged ({when})"
    else:
        saved = f"nothing was saved yet (last.pt is {when})"
    return (f"nlstm train: {where}; {saved}. Continue with (the same config and overrides):\n"
            f"  {_resume_command(args)}")


def _summary_line(summary: dict, seconds: float) -> str:
    """The run's outcome in words: how it ended, the best validation figures and their test."""
    how = {"done": "finished", "max_steps": "reached max_steps"}.get(summary["stopped"], summary["stopped"])
    minutes, secs = divmod(round(seconds), 60)
    took = f"{minutes} min {secs} s" if minutes else f"{secs} s"
    head = f"{how} at step {summary['step']} after {took}"
    best = summary.get("best") or {}
    if not best:
        return f"{head}; no evaluation yet. Run folder: {summary['run_dir']}"
    figures = "; ".join(
        f"best valid {k} {v['valid']:.4f} (epoch {v['epoch']}), its test {k} "
        + ("-" if v.get("test") is None else f"{v['test']:.4f}")
        for k, v in best.items()
    )
    return f"{head}: {figures}. Weights: {Path(summary['run_dir']) / 'best.pt'}"


# ----------------------------------------------------------------------------------------- plot
def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="draw learning curves of one or more runs (the paper's Figures 5-8)",
        description=(
            "Draw the figures of each RUN's metrics.jsonl per epoch, several runs on one chart "
            "(PNG). Default splits are the paper's: valid and test for PTB, train and valid "
            "otherwise; MNIST gets NLL and error panels."
        ),
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folder (or its metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: FIRST_RUN/curves.png)")
    p.add_argument(
        "--splits",
        default=None,
        help="comma-separated splits to draw, from train, valid, test (default: the paper's)",
    )
    p.add_argument("--title", default=None, help="chart title (default: the task)")
    p.set_defaults(handler=_run_plot, needs=("torch", "matplotlib"))


def _run_plot(args: argparse.Namespace) -> int:
    from training.plots import plot_runs

    splits = args.splits.split(",") if args.splits else None
    out = plot_runs(args.runs, out=args.out, splits=splits, title=args.title)
    print(out)
    return 0


# -------------------------------------------------------------------------------------- summary
def _add_summary(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "summary",
        help="a results table (markdown) of one or more runs, mean and spread over seeds",
        description=(
            "Print each RUN's figures at its best validation (the test figure at that "
            "evaluation, as the paper reports) as a markdown table. Runs whose folder names "
            "differ only by a trailing -sN / -seedN are one row: mean and sample standard "
            "deviation over the seeds. Every RUN must be of the same task."
        ),
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folder")
    p.set_defaults(handler=_run_summary)


def _run_summary(args: argparse.Namespace) -> int:
    from training.summary import group, markdown, read_run

    print(markdown(group([read_run(r) for r in args.runs])), end="")
    return 0


# ------------------------------------------------------------------------------------ visualize
def _add_visualize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "visualize",
        help="draw the cell activations of a trained model over a text (the paper's Figures 3-4)",
        description=(
            "Feed TEXT through a character model one character at a time and draw, per "
            "character, the first cells of every memory: for an NLSTM the inner memory "
            "tanh(c~) beside the outer memory c, for a stacked LSTM every layer's tanh(c). "
            "Writes cells.png and a self-contained cells.html."
        ),
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint (best.pt or last.pt of a run)")
    p.add_argument("--text", required=True, help="the text to feed, e.g. a sentence of the test set")
    p.add_argument("--out", type=Path, default=None, help="folder for the files (default: the checkpoint's)")
    p.add_argument("--cells", type=int, default=7, help="how many cells to draw per memory (default 7)")
    p.set_defaults(handler=_run_visualize, needs=("torch", "matplotlib"))


def _run_visualize(args: argparse.Namespace) -> int:
    from training.plots import visualize_checkpoint

    out = args.out if args.out is not None else args.checkpoint.resolve().parent
    for path in visualize_checkpoint(args.checkpoint, args.text, out, cells=args.cells):
        print(path)
        if path.name == "operations.txt":  # HM-LSTM: UPDATE / COPY / FLUSH per layer
            print(path.read_text(encoding="utf-8"), end="")
    return 0


# --------------------------------------------------------------------------------------- export
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to an ONNX model folder that serving runs without torch",
        description=(
            "Write OUT/model.onnx (one recurrent step, the state as explicit input and output), "
            "OUT/sequence.onnx (a whole sequence in one call, shipped when it measures faster), "
            "OUT/tokenizer.model (text models) and OUT/meta.json (docs/export.md). The folder is "
            "written atomically; an existing export at OUT is replaced, any other folder refused."
        ),
    )
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by `nlstm train`")
    p.add_argument("--out", type=Path, required=True, help="the folder to write, e.g. exported/ptb-nlstm")
    p.add_argument(
        "--no-sequence",
        action="store_true",
        help="export the step graph only (default: also the sequence graph, kept if faster)",
    )
    p.add_argument("--quantize", choices=("int8", "float16"), default=None,
                   help="also write a quantized copy (nlstm quantize OUT --out QUANTIZED_OUT), measured "
                        "against this export on the task's data")
    p.add_argument("--quantized-out", type=Path, default=None,
                   help="the quantized folder (default: OUT-int8 or OUT-float16)")
    _add_quantize_flags(p)
    p.set_defaults(handler=_run_export, needs=("torch", "onnx", "onnxscript"))


def _run_export(args: argparse.Namespace) -> int:
    started = time.monotonic()

    def progress(text: str) -> None:  # on stderr, so that stdout stays the summary below
        print(f"[{time.monotonic() - started:5.1f} s] {text}", file=sys.stderr, flush=True)

    progress("loading torch and the exporter")
    from training.export import export_checkpoint

    meta = export_checkpoint(args.checkpoint, args.out, sequence="never" if args.no_sequence else "auto",
                             progress=progress)
    print(f"exported {meta.task} {meta.kind} {meta.core} to {args.out}")
    for name, digest in meta.files.items():
        print(f"  {name:<16} sha256 {digest[:16]}...")
    t = meta.sequence_timing
    if t.get("shipped"):
        print(f"  sequence graph shipped: {t['speedup']}x the step graph per step")
    elif "speedup" in t:
        print(f"  sequence graph not shipped: {t['speedup']}x the step graph per step")
    else:
        print(f"  sequence graph not exported{': ' + t['error'] if 'error' in t else ''}")
    print(f"  state (B, {meta.num_slots}, {meta.hidden_size}): {', '.join(meta.state_slots)}")
    if args.quantize is None:
        return 0
    # In a fresh process: the quantizer times onnxruntime, which torch's threads (loaded here by
    # the export) would slow; `nlstm quantize` itself never imports torch.
    out = args.quantized_out or args.out.with_name(f"{args.out.name}-{args.quantize}")
    cmd = [sys.executable, "-m", "training.cli", "quantize", str(args.out), "--out", str(out),
           "--precision", args.quantize, *_quantize_argv(args)]
    return subprocess.run(cmd, check=False).returncode


# ------------------------------------------------------------------------------------- quantize
def _add_quantize_flags(p: argparse.ArgumentParser) -> None:
    # The thresholds' defaults live in training.quantize (None here: importing it would load
    # numpy and sentencepiece for every command).
    p.add_argument("--method", default="auto",
                   help="int8: auto (measure every candidate, keep the best), dynamic, static, or a "
                        "candidate's name (docs/export.md)")
    p.add_argument("--max-bpc-increase", type=float, default=None,
                   help="refuse a char model whose bits per character rise more than this on the "
                        "validation or test split (default 0.01)")
    p.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="refuse a glimpse classifier whose accuracy drops more than this many points "
                        "(default 0.3)")
    p.add_argument("--accept-cost", action="store_true",
                   help="write the quantized folder even over the threshold (meta.json says so)")
    p.add_argument("--data-dir", type=Path, default=_env("DATA_DIR", None, Path),
                   help="raw data of the model's task, to measure the cost on [NLSTM_DATA_DIR]")
    p.add_argument("--cache-dir", type=Path, default=_env("CACHE_DIR", None, Path),
                   help="prepared data cache [NLSTM_CACHE_DIR]")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the evaluation")


def _quantize_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--method", args.method, "--threads", str(args.threads)]
    for flag, value in (("--max-bpc-increase", args.max_bpc_increase), ("--max-accuracy-drop", args.max_accuracy_drop)):
        argv += [flag, repr(value)] if value is not None else []
    argv += ["--accept-cost"] if args.accept_cost else []
    argv += ["--data-dir", str(args.data_dir)] if args.data_dir else []
    argv += ["--cache-dir", str(args.cache_dir)] if args.cache_dir else []
    return argv


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize an exported folder (int8 on the CPU, float16 for CUDA), cost measured",
        description=(
            "Write OUT: FOLDER's step graph quantized with onnxruntime's tools, what to quantize "
            "chosen by measurement, and a meta.json with the precision, the settings, and the "
            "figures of both models on the full validation and test splits (docs/export.md). "
            "Refused (exit 3, nothing written) when the cost passes the threshold, unless "
            "--accept-cost."
        ),
    )
    p.add_argument("folder", type=Path, help="a float32 export, e.g. exported/ptb-nlstm")
    p.add_argument("--out", type=Path, required=True, help="the folder to write, e.g. exported/ptb-nlstm-int8")
    p.add_argument("--precision", choices=("int8", "float16"), default="int8")
    _add_quantize_flags(p)
    p.set_defaults(handler=_run_quantize, needs=("onnx",))  # onnx: the train extra


def _run_quantize(args: argparse.Namespace) -> int:
    from serving.formats import ExportMeta
    from training.quantize import (
        EvalData,
        QuantizationCost,
        QuantizationError,
        Thresholds,
        quantize_folder,
    )

    try:
        if args.precision == "float16":  # before the data is loaded: can CUDA start here?
            from serving.runtime import load_model

            try:
                load_model(args.folder, providers="cuda")
            except RuntimeError as exc:
                raise QuantizationError(
                    f"float16 step graphs are for the CUDA provider, which cannot start here: {exc}"
                ) from None
        meta = ExportMeta.from_folder(args.folder)
        data = EvalData.for_task(meta, args.data_dir, args.cache_dir)
        result = quantize_folder(
            args.folder, args.out, data=data, precision=args.precision, method=args.method,
            thresholds=Thresholds(**{k: v for k, v in (("max_bpc_increase", args.max_bpc_increase),
                                                       ("max_accuracy_drop", args.max_accuracy_drop))
                                     if v is not None}),
            accept_cost=args.accept_cost, threads=args.threads,
            providers="cuda" if args.precision == "float16" else "cpu",
        )
    except QuantizationCost as exc:
        print(f"nlstm quantize: REFUSED: {exc}", file=sys.stderr)
        return 3
    except RuntimeError as exc:  # QuantizationError, or CUDA that cannot start
        print(f"nlstm quantize: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(result.report))
    q = result.meta.quantization
    if result.over_threshold:
        print(f"WARNING: the cost {q['cost']} ({q['cost_unit']}) passes the threshold {q['threshold']}; "
              "written because --accept-cost was given", file=sys.stderr)
    print(f"wrote {args.out}: {result.meta.precision} ({q['settings']['name']}), "
          f"{sum((args.out / n).stat().st_size for n in result.meta.files) / 2**20:.1f} MiB")
    return 0


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlstm",
        description="Nested LSTMs and their baselines: train, export and serve.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_params(sub)
    _add_export(sub)
    _add_quantize(sub)
    _add_data(sub)
    _add_train(sub)
    _add_plot(sub)
    _add_summary(sub)
    _add_visualize(sub)
    _add_serve(sub)
    _add_generate(sub)
    _add_score(sub)
    _add_classify(sub)
    _add_session(sub)
    return parser


def _missing_modules(modules) -> list[str]:
    """The modules of `modules` that cannot be imported here (found without importing them)."""
    import importlib.util

    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = _missing_modules(getattr(args, "needs", ()))
    if missing:
        print(f"nlstm {args.command}: error: this command needs {', '.join(missing)}, which the base "
              f"install (serving only) leaves out: {TRAIN_EXTRA_HINT}", file=sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in TRAIN_EXTRA_MODULES:
            raise
        print(f"nlstm {args.command}: error: {exc.name} is not installed: {TRAIN_EXTRA_HINT}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        # Expected, user-facing failures (bad input, missing files, checksum mismatch, offline
        # download): one clear line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"nlstm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
