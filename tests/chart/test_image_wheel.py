"""The container image, as far as it can be tested without a Docker engine.

The Dockerfile's own RUN commands are executed here, with its absolute paths (/src, /wheels,
/opt/spotguard) moved into a temporary directory: the wheel builds with `pip wheel --no-deps`,
installs with its dependencies into a clean venv that has no pip of its own, and the installed
`spotguard` answers `version` and `run --help` the way the image's ENTRYPOINT would run it, without
writing anything (the container's root filesystem is read-only). No image is built in CI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spotguard import config

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    text = re.sub(r"\\\n", " ", text)                       # line continuations
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            stages.append(Stage(base=parts[0], name=parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


STAGES = parse_dockerfile(DOCKERFILE.read_text())


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    pinned = re.search(r"^ARG PYTHON_IMAGE=python:(3\.11\.\d+)-slim(-\w+)?$", text, re.M)
    assert pinned, "the base image must be python:3.11.<patch>-slim, pinned by full version"
    assert [s.name for s in STAGES] == ["build", "venv", None]
    assert all(s.base == "${PYTHON_IMAGE}" for s in STAGES)
    build, venv, final = STAGES
    assert any("pip wheel --no-deps" in run for run in build.all("RUN"))
    assert any("python -m venv" in run for run in venv.all("RUN"))
    # The final stage: the venv and nothing else, run as a non-root uid with the daemon's entrypoint.
    assert final.all("COPY") == ["--from=venv /opt/spotguard /opt/spotguard"]
    assert not final.all("RUN")
    assert final.all("USER") == ["65532:65532"]
    assert final.all("ENTRYPOINT") == ['["spotguard"]'] and final.all("CMD") == ['["run"]']
    env = " ".join(final.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PATH=/opt/spotguard/bin:$PATH" in env
    labels = " ".join(final.all("LABEL"))
    for label in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines[0] == "*"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    copied = set()
    for args in STAGES[0].all("COPY"):
        copied.update(Path(p).name for p in args.split()[:-1])
    assert copied <= allowed, f"COPY uses files .dockerignore keeps out: {copied - allowed}"


def _localize(command: str, root: Path) -> str:
    """A RUN command with the image's absolute paths moved under root and the image's python/pip
    replaced by this interpreter (same minor version as the image's)."""
    for path in ("/opt/spotguard", "/wheels", "/src"):
        command = re.sub(rf"(?<![\w/.-]){re.escape(path)}", str(root) + path, command)
    python = shlex.quote(sys.executable)
    command = re.sub(r"(^|&&\s*)pip\b", rf"\1{python} -m pip", command)
    command = re.sub(r"(^|&&\s*)python\b", rf"\1{python}", command)
    return command


def _stage_env(stage: Stage) -> dict[str, str]:
    env = dict(os.environ)
    for args in stage.all("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def _copy_build_context(stage: Stage, root: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for args in stage.all("COPY"):
        if args.startswith("--from="):
            continue
        *sources, destination = args.split()
        target = root / destination.lstrip("/")
        for source in sources:
            src = REPO / source
            if not src.exists():
                pytest.fail(f"the Dockerfile copies {source}, which the repository does not have (yet)")
            dest = target / src.name if destination.endswith("/") else target
            if src.is_dir():
                shutil.copytree(src, dest, ignore=ignore)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)


def _files(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*")}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_installs_into_a_clean_venv_and_the_cli_runs(tmp_path: Path) -> None:
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the image runs Python 3.11; this interpreter is another version")
    build, venv, final = STAGES
    root = tmp_path
    _copy_build_context(build, root)
    (root / "wheels").mkdir()
    for stage in (build, venv):
        for run in stage.all("RUN"):
            command = _localize(run, root)
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=root,
                                    env=_stage_env(stage), capture_output=True, text=True, timeout=800)
            assert result.returncode == 0, f"{run}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    wheels = list((root / "wheels").glob("spotguard-*.whl"))
    assert len(wheels) == 1, wheels
    # The product's wheel ships the daemon only: the simulation is the spotguard-sim distribution.
    with zipfile.ZipFile(wheels[0]) as wheel:
        packages = {name.split("/")[0] for name in wheel.namelist() if name.endswith(".py")}
        assert packages == {"spotguard"}, packages
        assert not [name for name in wheel.namelist() if "sim" in name.split("/")[1:-1]]
    venv_dir = root / "opt" / "spotguard"
    assert not (venv_dir / "bin" / "pip").exists(), "the runtime venv should carry no pip"

    entrypoint = json.loads(final.all("ENTRYPOINT")[0])
    env = _stage_env(final)
    env["PATH"] = f"{venv_dir / 'bin'}:{os.environ['PATH']}"
    env["HOME"] = str(tmp_path / "home")
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    before = _files(venv_dir)

    def spotguard(*args: str) -> subprocess.CompletedProcess[str]:
        executable = shutil.which(entrypoint[0], path=env["PATH"])
        assert executable and executable.startswith(str(venv_dir)), executable
        return subprocess.run([executable, *args], env=env, capture_output=True, text=True, timeout=60,
                              cwd=tmp_path)

    version = spotguard("version")
    assert version.returncode == 0, version.stderr
    assert "0.1.0" in version.stdout
    top = spotguard("--help")
    assert top.returncode == 0 and "run" in top.stdout and "sim" not in top.stdout.split(), top.stdout
    moved = spotguard("sim", "demo")
    assert moved.returncode == 2 and "spotguard-sim" in moved.stderr and len(moved.stderr.splitlines()) == 1
    helped = spotguard(*json.loads(final.all("CMD")[0]), "--help")
    assert helped.returncode == 0, helped.stderr
    for setting in config.SETTINGS:
        assert setting.flag in helped.stdout and setting.env in helped.stdout, setting.flag
    # Nothing written next to the code: the image's root filesystem is read-only.
    assert _files(venv_dir) == before
