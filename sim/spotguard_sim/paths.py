"""Where the simulation finds what lives in the spotguard source tree, not in any package: the Helm
chart (`daemonset/`), the Go sources of the control plane (`tools/`) and the chart's preStop helper.

The simulation is a developer's and a CI tool run from a checkout, so the tree is found by walking
up from this file (an editable install) or from the working directory; `SPOTGUARD_REPO` names it
explicitly. Not finding it is one readable error, not a missing-file traceback deep in a build.
"""

from __future__ import annotations

import os
import subprocess
from functools import cache
from pathlib import Path

# A file only the spotguard repository has at its root.
_MARKER = Path("daemonset") / "Chart.yaml"


class SourceTreeNotFound(RuntimeError):
    """The spotguard source tree is not where the simulation looked."""


@cache
def repo_root() -> Path:
    explicit = os.environ.get("SPOTGUARD_REPO")
    if explicit:
        root = Path(explicit).resolve()
        if not (root / _MARKER).is_file():
            raise SourceTreeNotFound(f"SPOTGUARD_REPO={explicit}: no {_MARKER} there")
        return root
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for folder in (start, *start.parents):
            if (folder / _MARKER).is_file():
                return folder
    raise SourceTreeNotFound("the spotguard source tree was not found above this package or the working "
                             "directory: run spotguard-sim from a checkout, or set SPOTGUARD_REPO to one")


def chart_dir() -> Path:
    return repo_root() / "daemonset"


def controlplane_source() -> Path:
    return repo_root() / "tools" / "controlplane"


def prestop_helper() -> Path:
    """The chart's drain-aware preStop helper (daemonset/files/vllm-drain-prestop.py)."""
    return chart_dir() / "files" / "vllm-drain-prestop.py"


def installed(script: str) -> Path | None:
    """What `scripts/<script> --print` names (the tool that installer built or installed, in the
    cache outside the checkout), or None when it has not run: the installer alone knows the path."""
    out = subprocess.run(["bash", str(repo_root() / "scripts" / script), "--print"], capture_output=True, text=True)
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None
