"""The deployment tests' reading of Dockerfiles (tests/test_deploy.py,
tests/test_deploy_compose.py): each stage's instructions, and the serving Dockerfile's stages
by name."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                out[key] = value
        return out

    def exec_form(self, keyword: str) -> list[str]:
        (args,) = self.all(keyword)[-1:] or [None]
        if args is None:
            return []
        if keyword == "HEALTHCHECK":
            args = args.split("CMD", 1)[1]
        return json.loads(args)


def parse_dockerfile(path: Path) -> list[Stage]:
    """Instructions by stage: continuation lines joined, comments and parser directives dropped."""
    logical, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, parts[0]))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return stages


def serving_stages() -> dict[str, Stage]:
    """The serving Dockerfile's stages by name; the serving image must be the last."""
    parsed = parse_dockerfile(REPO / "Dockerfile")
    assert parsed[-1].name == "serve", "the serving image must be the default (last) target"
    return {s.name: s for s in parsed}
