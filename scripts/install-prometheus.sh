#!/usr/bin/env bash
# Install promtool (and the prometheus server binary) from Debian's `prometheus` package.
#
# Used by the alert-rule tests (tests/alerts/, `promtool check rules` / `promtool test rules`) and by
# the simulation's Prometheus. The tests start their own Prometheus on loopback when they need one,
# so the Debian service (and the node exporter the package recommends) must NOT keep running:
# they would hold ports 9090/9100 and scrape nothing useful.
#
# Idempotent: does nothing when promtool is already on PATH.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    echo "install-prometheus: promtool already installed ($(command -v promtool)); nothing to do"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-prometheus: apt-get not found; install Prometheus 2.x (promtool) another way and put promtool on PATH" >&2
    exit 1
fi
# As root, or through sudo when it needs no password (./dev demo as a user); else say what to do.
as_root=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        as_root=(sudo -n)
    else
        echo "install-prometheus: installing Debian's prometheus needs root (try: sudo $0)" >&2
        exit 1
    fi
fi

# The package's postinst may not start prometheus where there is an init system.
"${as_root[@]}" bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" --no-service-start prometheus

# Belt and braces: where systemd runs, make sure the service is neither running nor enabled.
"${as_root[@]}" systemctl disable --now prometheus 2>/dev/null || true
"${as_root[@]}" systemctl disable --now prometheus-node-exporter 2>/dev/null || true

# Anything the package started anyway (without systemd some postinst scripts fall back to starting
# the daemon directly) is stopped by its own pid. Processes are matched on their executable path,
# not on a name pattern, so nothing else on the machine is touched.
for exe in /usr/bin/prometheus /usr/bin/prometheus-node-exporter; do
    for proc in /proc/[0-9]*; do
        if [ "$(readlink "$proc/exe" 2>/dev/null || true)" = "$exe" ]; then
            echo "install-prometheus: stopping $exe (pid ${proc#/proc/}) started by the package"
            "${as_root[@]}" kill "${proc#/proc/}" 2>/dev/null || true
        fi
    done
done

# Report (do not kill) anything else still listening on Prometheus' default ports.
if command -v ss >/dev/null 2>&1; then
    if ss -ltnH 2>/dev/null | awk '{print $4}' | grep -Eq ':(9090|9100)$'; then
        echo "install-prometheus: warning: something still listens on 9090 or 9100:" >&2
        ss -ltnp 2>/dev/null | grep -E ':(9090|9100) ' >&2 || true
    fi
fi

echo "install-prometheus: $(promtool --version 2>&1 | head -n 1)"
