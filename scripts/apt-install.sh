#!/usr/bin/env bash
# scripts/apt-install.sh [--no-service-start] PACKAGE...: apt-get update, then install the packages
# (no recommends), one caller at a time. As root.
#
# Every apt use of the project goes through here because ./dev test runs tools/kind/setup.sh (which
# installs docker.io) in the background while the foreground installs Prometheus: on a fresh machine
# both reach apt at once, and apt-get does not wait for dpkg's lock by default, it fails. flock
# serializes the project's own callers; DPkg::Lock::Timeout waits for anyone else's apt
# (unattended-upgrades, an admin).
#
# --no-service-start: the packages' maintainer scripts may not start their services (a policy-rc.d
# that says no, for the duration of the install, when none exists). Held under the same lock, so it
# never stops another caller's install from starting what it wants.
set -euo pipefail

no_service_start=0
if [ "${1:-}" = --no-service-start ]; then
    no_service_start=1
    shift
fi
[ $# -gt 0 ] || { echo "usage: $0 [--no-service-start] PACKAGE..." >&2; exit 2; }

exec 8>/tmp/spotguard-apt.lock
if ! flock -n 8; then
    echo "apt-install: waiting for another of this project's installs to finish" >&2
    flock 8
fi

policy_rc=/usr/sbin/policy-rc.d
created_policy=0
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy_rc"; fi; }
trap cleanup EXIT
if [ "$no_service_start" = 1 ] && [ ! -e "$policy_rc" ]; then
    # exit 101 tells invoke-rc.d "do not start services"
    printf '#!/bin/sh\nexit 101\n' >"$policy_rc"
    chmod 755 "$policy_rc"
    created_policy=1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update
apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "$@"
