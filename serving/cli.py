"""The serving side of the `nlstm` command: serve, generate, score, classify and session.

These commands run in the base install (`pip install nlstm`, the serving image), which has no
torch: this module imports nothing of `training` and each handler imports its implementation
(serving.server, serving.commands, serving.client) lazily, so that a command loads only what it
runs. `nlstm` (training/cli.py's `main`) hands a serving command's arguments to `main` here
before anything of the training side is built; `python -m serving.cli ...` runs them the same
way. Everything below this module takes plain arguments. This module owns `serve`, whose flags
are built from the table in serving/settings.py (SERVE_FLAGS, with their ranges), and the
parser; the client commands (generate, score, classify, session) are serving/cli_client.py's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving import cli_client
from serving.settings import SERVE_FLAGS, check_serve_settings, env_default

COMMANDS = ("serve", "generate", "score", "classify", "session")


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
    for flag in SERVE_FLAGS:  # serving/settings.py: one row per flag, its range next to it
        typed = {} if flag.type is str else {"type": flag.type}  # argparse's default: strings
        p.add_argument(
            "--" + flag.name.replace("_", "-"),
            **typed,
            default=env_default(flag.env, flag.default, flag.type),
            help=flag.help,
        )
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from serving.auth import ApiKeys, server_credentials
    from serving.engine import Limits
    from serving.limits import ServerLimits
    from serving.server import serve

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    check_serve_settings(vars(args))  # every numeric flag in its range, or one clear error
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
    tls = (
        server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
        if args.tls_cert
        else None
    )
    keys = ApiKeys.from_file(args.api_keys_file) if args.api_keys_file else None
    limits = Limits(
        max_chars=args.max_chars,
        max_text=args.max_text,
        max_sessions=args.max_sessions,
        idle_timeout=args.idle_timeout,
        max_batch=args.max_batch,
        max_wait=args.max_wait_ms / 1000,
        stream_interval=args.stream_interval_ms / 1000,
        max_messages_per_s=args.max_messages_per_s,
        max_stop_chars=args.max_stop_chars,
        max_glimpses=args.max_glimpses,
        max_sessions_per_client=args.max_sessions_per_client,
        prefix_cache_mb=args.prefix_cache_mb,
        checkpoint_interval=args.session_checkpoint_s,
    )
    server_limits = ServerLimits(
        max_request_bytes=args.max_request_bytes,
        max_inflight_bytes=args.max_inflight_bytes,
        max_concurrent_calls=args.max_concurrent_calls,
        max_client_requests_per_s=args.max_client_requests_per_s,
    )
    runtime = {"providers": args.providers, "intra_op_threads": args.threads or None}
    snapshot_key = _read_snapshot_key(args.snapshot_key_file) if args.snapshot_key_file else None
    asyncio.run(
        serve(
            args.models,
            port=args.port,
            host=args.host,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            metrics_host=args.metrics_host,
            limits=limits,
            grace=args.grace,
            runtime_options=runtime,
            server_limits=server_limits,
            api_keys=keys,
            tls=tls,
            snapshot_key=snapshot_key,
            session_store=args.session_store,
            http_port=args.http_port,
            http_ssl=http_ssl(args) if args.http_port is not None else None,
        )
    )
    return 0


def http_ssl(args: argparse.Namespace):
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
        raise ValueError(
            f"--snapshot-key-file: {path} holds {len(key)} bytes; a snapshot key needs at least 16 "
            f"(e.g. `openssl rand -hex 32 > {path}`)"
        )
    return key


# ------------------------------------------------------------------------------------------ main
def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the serving commands (COMMANDS) to the `nlstm` parser's subcommands."""
    _add_serve(sub)
    cli_client.add_generate(sub)
    cli_client.add_score(sub)
    cli_client.add_classify(sub)
    cli_client.add_session(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nlstm", description="Serve exported models and call them."
    )
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def run_handler(args: argparse.Namespace) -> int:
    """Run the parsed command's handler: its exit code, 130 on Ctrl-C, and 2 with one line on
    standard error for the failures a user can fix."""
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:
        # Expected, user-facing failures (bad input, missing files, checksum mismatch, no
        # server, offline download): one clear line, no traceback. Anything else is a bug and
        # keeps its traceback.
        print(f"nlstm {args.command}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run_handler(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
