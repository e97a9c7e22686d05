#!/usr/bin/env bash
# Run REAL vLLM 0.32.0 (CPU build) on 127.0.0.1 with the tiny random model, in the foreground.
#
#   scripts/run-real-vllm.sh [--port N] [-- MORE_VLLM_FLAGS...]     e.g. -- --shutdown-timeout 10
#
# Installs vLLM and makes the model first when they are missing (scripts/install-vllm.sh,
# scripts/make-tiny-llama.py). Prints `port=N` and `url=http://127.0.0.1:N` on stdout, then execs
# vLLM's API server (nice 10), so its pid is this script's pid: SIGTERM it to see vLLM's own shutdown.
# Its children (EngineCore, Worker) share its process group; `kill -KILL -- -PID` ends them all.
# The flags and environment are the ones scripts/real_vllm.py uses (fast start, small footprint).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
port=0
while [ $# -gt 0 ]; do
    case "$1" in
        --port) port=$2; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "run-real-vllm: unknown argument '$1' (vLLM flags go after --)" >&2; exit 2 ;;
    esac
done

python=$("$here/install-vllm.sh" | tail -n 1)
model=$("$python" "$here/make-tiny-llama.py" | tail -n 1)
# The flags, environment and a free port come from the Python helper, so both launchers agree.
mapfile -t setup < <(python3 - "$here" "$python" "$model" "$port" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import real_vllm
port = int(sys.argv[4]) or real_vllm.free_port()
server = real_vllm.RealVllm(python=Path(sys.argv[2]), model=Path(sys.argv[3]), port=port)
print(port)
for key, value in real_vllm.SERVER_ENV.items():
    print(f"{key}={value}")
print("--")
for arg in server.command():
    print(arg)
PY
)
port=${setup[0]}
envs=()
i=1
while [ "${setup[$i]}" != "--" ]; do envs+=("${setup[$i]}"); i=$((i + 1)); done
cmd=("${setup[@]:$((i + 1))}")

echo "port=$port"
echo "url=http://127.0.0.1:$port"
exec env "${envs[@]}" nice -n 10 "${cmd[@]}" "$@"
