"""The client commands of `nlstm` (the parser is built in serving/cli.py): generate, score,
classify and session, their connection flags (--target, TLS, the API key) and, for generate and
score, the local backend (`--backend onnx`: an exported folder run here on onnxruntime, no
server). Each handler imports its implementation (serving.commands, serving.client) lazily, so
that a command loads only what it runs; a call the server refused ends the command like bad
input.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from serving.settings import BUNDLED_MODELS, env_default


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="",
        help="model name: a folder under the server's --models (bundled: ptb-nlstm, poems-nlstm, "
        "mnist-nlstm); needed without --session",
    )
    p.add_argument(
        "--session",
        default="",
        help="continue an existing session's state (default: none, a fresh state)",
    )
    _add_connection_flags(p)


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=env_default("TARGET", "localhost:50051"),
        help="server address host:port [NLSTM_TARGET] (default: localhost:50051)",
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="deadline in seconds (default: none)"
    )
    p.add_argument(
        "--api-key",
        default=env_default("API_KEY", None),
        help="API key of a server with --api-keys-file, sent as 'authorization: Bearer KEY' "
        "[NLSTM_API_KEY]",
    )
    p.add_argument(
        "--tls-ca",
        type=Path,
        default=env_default("TLS_CA", None, Path),
        help="connect over TLS, trusting the server certificate this PEM CA signed [NLSTM_TLS_CA]",
    )
    p.add_argument(
        "--tls-client-cert",
        type=Path,
        default=env_default("TLS_CLIENT_CERT", None, Path),
        help="PEM certificate for a server with mutual TLS (with --tls-client-key, needs --tls-ca) "
        "[NLSTM_TLS_CLIENT_CERT]",
    )
    p.add_argument(
        "--tls-client-key",
        type=Path,
        default=env_default("TLS_CLIENT_KEY", None, Path),
        help="PEM private key of --tls-client-cert [NLSTM_TLS_CLIENT_KEY]",
    )


def _add_backend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("server", "onnx"),
        default="server",
        help="server: a running nlstm serve (--target); onnx: the exported folder "
        "--models/--model, run here on onnxruntime (no server, no torch) (default: server)",
    )
    p.add_argument(
        "--models",
        type=Path,
        default=env_default("MODELS", BUNDLED_MODELS, Path),
        help="--backend onnx: folder of exported models [NLSTM_MODELS] (default: the bundled "
        "exported/)",
    )
    p.add_argument(
        "--providers",
        default=env_default("PROVIDERS", "auto"),
        choices=("auto", "cpu", "cuda"),
        help="--backend onnx: onnxruntime providers [NLSTM_PROVIDERS] (default: auto)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="--backend onnx: onnxruntime intra-op threads; 0 lets onnxruntime choose (default: 0)",
    )


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a running server (or a local exported model), streamed as it "
        "arrives",
        description="Sample text from a character model and print it as it arrives: after the "
        "start symbol and --prompt, up to --max-chars characters, stopping early at the model's "
        "end marker or a --stop text. --backend server (the default) asks a running `nlstm serve` "
        "(--target); --backend onnx runs the exported folder --models/--model here on onnxruntime "
        "(no server, no torch), with the same sampling, so the same --seed gives the same text.",
    )
    _add_client_flags(p)
    p.add_argument("--prompt", default="", help="text fed to the model first (default: none)")
    p.add_argument(
        "--max-chars", type=int, default=200, help="most characters to generate (default: 200)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="divides the logits before sampling; 0 = greedy (default: 1)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="sample among the K likeliest only; 0 = off (default: 0)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=0.0,
        help="sample among the likeliest characters holding probability P; 0 or 1 = off (default: "
        "0)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed: the same seed and request give the same text (default: a random one)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop after this text (repeatable, at most 4; default: none)",
    )
    _add_backend_flags(p)
    p.set_defaults(handler=lambda a: _client("generate", a))


def add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="bits per character of a text file under a served (or a local exported) model",
        description="Bits per character of a text file, every character scored from a fresh state "
        "(or from --session's). --backend server asks a running server's Score; "
        "--backend onnx runs the exported folder --models/--model here on onnxruntime "
        "(no server, no torch) and prints the same figures.",
    )
    p.add_argument("file", help="UTF-8 text file, or - for standard input")
    _add_client_flags(p)
    p.add_argument(
        "--per-char", action="store_true", help="print each character's bits too (default: off)"
    )
    _add_backend_flags(p)
    p.set_defaults(handler=lambda a: _client("score", a))


def add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "classify",
        help="stream an MNIST image's 20 glimpses to a served classifier",
        description="Cut MNIST test image --index into the paper's 20 glimpses of 7x7 pixels, "
        "stream them to a running server's ClassifyGlimpses (--target) and print the predicted "
        "class after each glimpse, then the true label. The test images come from `nlstm data "
        "download mnist`.",
    )
    _add_client_flags(p)
    p.add_argument("--index", type=int, default=0, help="which test image, 0 to 9999 (default: 0)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with mnist/t10k-images-idx3-ubyte.gz, where `nlstm data download mnist` puts "
        "it (default: the same as nlstm data's: $NLSTM_DATA_DIR, else ~/.cache/nlstm/raw)",
    )
    p.set_defaults(handler=lambda a: _client("classify", a))


def add_session(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "session",
        help="create, show, close, snapshot, restore or fork a session on a running server",
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

    action("create", "a new session on --model").add_argument(
        "--model", required=True, help="model name"
    )
    action("show", "a session's model, position, idle timeout").add_argument("session_id")
    action("close", "free a session").add_argument("session_id")
    q = action("snapshot", "write a session's state to a file")
    q.add_argument("session_id")
    q.add_argument(
        "--out", required=True, help="file to write (atomically), or - for standard output"
    )
    action("restore", "a new session from a snapshot file").add_argument(
        "file", help="a file written by `nlstm session snapshot`, or - for standard input"
    )
    action("fork", "a new session with a copy of a session's state").add_argument("session_id")


def _connect(args: argparse.Namespace, local: bool = False):
    """A serving.client.Client for the connection flags, once the server answers."""
    from serving.client import TLS
    from serving.commands import connect

    if (args.tls_client_cert or args.tls_client_key) and not args.tls_ca:
        raise ValueError(
            "--tls-client-cert and --tls-client-key need --tls-ca (mutual TLS is TLS first)"
        )
    tls = TLS(args.tls_ca, args.tls_client_cert, args.tls_client_key) if args.tls_ca else None
    return connect(args.target, api_key=args.api_key, tls=tls, timeout=args.timeout, local=local)


@contextlib.contextmanager
def _server_errors(server_error: type[Exception]):
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
        commands.generate_local(
            str(args.models),
            args.model,
            args.prompt,
            args.max_chars,
            args.temperature,
            args.top_k,
            args.top_p,
            args.seed,
            args.stop,
            providers=args.providers,
            threads=args.threads or None,
        )
    elif command == "score" and args.backend == "onnx":
        commands.score_local(
            str(args.models),
            args.model,
            args.file,
            args.per_char,
            args.providers,
            args.threads or None,
        )
    else:
        from serving.client import ServerError

        if command == "classify":  # the image first: a missing file is reported without a server
            from serving.formats import (
                default_data_dir,
            )  # where `nlstm data download mnist` puts it

            image, label = commands.read_mnist_image(
                str(args.data_dir or default_data_dir()), args.index
            )
        with _connect(args, local=command != "classify") as client, _server_errors(ServerError):
            if command == "generate":
                commands.generate(
                    client,
                    args.model,
                    args.prompt,
                    args.max_chars,
                    args.temperature,
                    args.top_k,
                    args.top_p,
                    args.seed,
                    args.stop,
                    args.session,
                )
            elif command == "score":
                commands.score(client, args.model, args.file, args.per_char, args.session)
            else:
                commands.classify(client, args.model, image, label)
    return 0
