"""A Docker engine for the `docker` tests (tests/test_docker.py), and the images they share.

The engine: the one at NLSTM_DOCKER_HOST when that is set (.ci/run starts dockerd itself, with
.ci/dockerd.sh, and stops it at the end), else a dockerd started here (as root, overlay2 storage,
else vfs, which needs no kernel support), on a private socket, and stopped when the tests are
done, with everything it ran. Either way its data root (NLSTM_DOCKER_ROOT, default
/var/lib/nlstm-test-docker) outlives the tests, so a second run on the same machine finds the
local bases and the build cache (minutes saved).

Images: `Images` builds each one at most once per pytest session (deploy/build-image.sh, with
--local-base), whichever test asks first; the conftest.py fixtures `docker_engine` and
`docker_images` are session-scoped, so every test module shares them.

Where Docker cannot run (not root; dockerd, runc or debootstrap missing) the tests skip and say
why; under CI (CI=true, or NLSTM_REQUIRE_DOCKER=1, which .ci/run sets for its Docker step) they
fail instead: there the images must be checked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("NLSTM_DOCKER_ROOT", "/var/lib/nlstm-test-docker"))
# What .ci/docker.sh installs from Debian: the engine, its runtime, and the local-base tools.
TOOLS = {
    "dockerd": "docker.io",
    "docker": "docker.io",
    "containerd": "containerd",
    "runc": "runc",
    "iptables": "iptables",
    "debootstrap": "debootstrap",
}


def required() -> bool:
    return (
        os.environ.get("CI", "").lower() == "true" or os.environ.get("NLSTM_REQUIRE_DOCKER") == "1"
    )


def unavailable(reason: str):
    if required():
        pytest.fail(f"{reason}; under CI the Docker tests must run (.ci/docker.sh installs Docker)")
    pytest.skip(reason)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Engine:
    """The docker CLI pointed at the tests' dockerd."""

    env: dict[str, str]

    def run(
        self, argv: list[str], timeout: float, check: bool = True, cwd: Path = REPO
    ) -> subprocess.CompletedProcess:
        out = subprocess.run(
            argv,
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {out.returncode}:\n{tail(out.stdout)}\n{tail(out.stderr)}"
            )
        return out

    def docker(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess:
        return self.run(["docker", *args], timeout=timeout, check=check)

    def compose_command(self) -> list[str]:
        """`docker compose` (the v2 plugin) where the CLI has it, else Debian's docker-compose
        (v1)."""
        if self.run(["docker", "compose", "version"], timeout=30, check=False).returncode == 0:
            return ["docker", "compose"]
        if shutil.which("docker-compose"):
            return ["docker-compose"]
        unavailable(
            "neither `docker compose` nor docker-compose is installed"
            " (apt-get install docker-compose)"
        )
        raise AssertionError("unreachable")

    def ensure_image(self, image: str) -> str:
        """`image` present: already, pulled, or built by deploy/local-base.sh (no registry here;
        a stand-in it built before is refreshed if its recipe changed). Returns how it came."""
        label = self.docker(
            "image",
            "inspect",
            "--format",
            '{{ index .Config.Labels "org.nlstm.local-base" }}',
            image,
            check=False,
        )
        if label.returncode == 0 and label.stdout.strip() in ("", "<no value>"):
            return "present"
        if (
            label.returncode != 0
            and self.docker("pull", "-q", image, timeout=600, check=False).returncode == 0
        ):
            return "pulled"
        # made here from Debian packages, or brought up to date if its recipe changed
        self.run([str(REPO / "deploy" / "local-base.sh"), "--for-image", image], timeout=1500)
        return "local"


@dataclass
class Build:
    """One deploy/build-image.sh run: its output, how long it took, and whether it worked."""

    target: str
    log: str
    seconds: float
    ok: bool


@dataclass
class Images:
    """The images of one pytest session: each built (or its base made) once, on first use."""

    engine: Engine
    builds: dict[str, Build] = field(default_factory=dict)
    bases: dict[str, str] = field(default_factory=dict)

    def build(self, target: str, check: bool = True) -> Build:
        """deploy/build-image.sh TARGET --local-base, once per session (a failure too: it is
        reported to every test that needs the image, not retried)."""
        if target not in self.builds:
            start = time.monotonic()
            out = self.engine.run(
                [str(REPO / "deploy" / "build-image.sh"), target, "--local-base"],
                timeout=2400,
                check=False,
            )
            seconds = time.monotonic() - start
            self.builds[target] = Build(
                target, out.stdout + out.stderr, seconds, out.returncode == 0
            )
            outcome = "built" if out.returncode == 0 else "FAILED"
            driver = self.engine.env.get("NLSTM_STORAGE_DRIVER")
            print(f"nlstm:{target}: {outcome} in {seconds:.0f} s (storage driver {driver})")
        build = self.builds[target]
        if check and not build.ok:
            raise AssertionError(
                f"deploy/build-image.sh {target} --local-base failed:\n{tail(build.log)}"
            )
        return build

    def base(self, image: str) -> str:
        """`image` present (Engine.ensure_image), once per session."""
        if image not in self.bases:
            self.bases[image] = self.engine.ensure_image(image)
        return self.bases[image]


def start_engine(workdir: Path) -> tuple[Engine, Dockerd | None]:
    """The engine at NLSTM_DOCKER_HOST (started by .ci/run) if set, else a dockerd of our own
    (returned, for the caller to stop)."""
    host = os.environ.get("NLSTM_DOCKER_HOST")
    if host:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        engine = Engine({**env, "DOCKER_HOST": host})
        info = engine.docker("info", "--format", "{{.Driver}}", timeout=30, check=False)
        if info.returncode != 0:
            unavailable(f"NLSTM_DOCKER_HOST={host} does not answer: {info.stderr.strip()}")
        engine.env["NLSTM_STORAGE_DRIVER"] = info.stdout.strip()
        return engine, None
    dockerd = Dockerd(workdir)
    return dockerd.engine, dockerd


class Dockerd:
    """dockerd in its own process group; stop() ends it and everything it started.

    Storage: overlay2 where the kernel allows it, else vfs (which works anywhere but copies the
    whole filesystem for every layer and every build step's container: on the 2-core machine a
    build took 24 minutes on vfs, a few on overlay2). NLSTM_DOCKER_STORAGE_DRIVERS changes the
    order ("vfs" alone: vfs only)."""

    def __init__(self, workdir: Path):
        if os.geteuid() != 0:
            unavailable("the Docker tests start their own dockerd, which needs root")
        missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
        if missing:
            unavailable(
                f"not installed: {', '.join(missing)} (.ci/docker.sh installs them from Debian)"
            )
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = workdir / "docker.sock"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        self.engine = Engine({**env, "DOCKER_HOST": f"unix://{self.socket}"})
        self.proc: subprocess.Popen | None = None
        failures = []
        for driver in os.environ.get("NLSTM_DOCKER_STORAGE_DRIVERS", "overlay2,vfs").split(","):
            log_path = workdir / f"dockerd-{driver}.log"
            if self._start(driver, workdir, log_path):
                self.engine.env["NLSTM_STORAGE_DRIVER"] = driver  # for the tests' reports
                return
            failures.append(f"--storage-driver={driver}:\n{tail(log_path.read_text(), 15)}")
        unavailable("dockerd did not start:\n" + "\n".join(failures))

    def _start(self, driver: str, workdir: Path, log_path: Path) -> bool:
        """Start dockerd with `driver`; False (and nothing left running) if it does not come up."""
        self.log = log_path.open("w")
        argv = [
            "dockerd",
            f"--storage-driver={driver}",
            f"--data-root={DATA_ROOT}",
            f"--exec-root={workdir / 'exec'}",
            f"--host=unix://{self.socket}",
            f"--pidfile={workdir / 'dockerd.pid'}",
        ]
        self.proc = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and self.proc.poll() is None:
            if (
                self.socket.exists()
                and self.engine.docker("info", timeout=30, check=False).returncode == 0
            ):
                return True
            time.sleep(0.5)
        self.stop()
        return False

    def stop(self) -> None:
        """SIGTERM: dockerd stops its containers and its containerd; SIGKILL to the group after
        60 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(60)
        # whatever is left of the group (containerd, shims), by its id: ours alone
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        self.log.close()
