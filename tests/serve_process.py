"""`nlstm serve` in a subprocess for the tests that need a real process (a signal, the command's
flags and environment): started on port 0 with its log on a pipe, and the port it prints read
back (tests/test_server_settings.py, tests/test_http_servers.py, tests/test_hardening.py,
tests/test_cli_serving.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path


def serve_argv(models_dir: Path, *args: str, prelude: str = "") -> list[str]:
    """The command line of `nlstm serve --models DIR --host localhost ARGS` in this interpreter;
    with `prelude`, Python source that interpreter runs before the command (tests/
    test_cli_serving.py makes the train extra unimportable with it)."""
    command = (
        [
            "-c",
            f"{prelude}\nimport sys\nfrom training.cli import main\nsys.exit(main(sys.argv[1:]))\n",
        ]
        if prelude
        else ["-m", "training.cli"]
    )
    return [
        sys.executable,
        *command,
        "serve",
        "--models",
        str(models_dir),
        "--host",
        "localhost",
        *args,
    ]


def start_serve(
    models_dir: Path, *args: str, cwd: Path | None = None, prelude: str = "", **env: str
):
    """`nlstm serve --models DIR --host localhost --port 0 ARGS`, unbuffered, with `env` added
    to this process's environment (and `prelude` run first: serve_argv); its log is proc.stderr
    (text)."""
    return subprocess.Popen(
        serve_argv(models_dir, "--port", "0", *args, prelude=prelude),
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
        cwd=cwd,
    )


def port_in_log(proc: subprocess.Popen, pattern: str = r"on port (\d+)", timeout: float = 60):
    """The port the first log line matching `pattern` names (its group 1); fails with the log
    read so far when none comes within `timeout` seconds or the log ends (the server exited)."""
    assert proc.stderr is not None
    port, lines, deadline = None, [], time.time() + timeout
    while port is None and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:  # end of the log: the process has exited
            break
        lines.append(line)
        if m := re.search(pattern, line):
            port = int(m.group(1))
    assert port, "".join(lines)
    return port
