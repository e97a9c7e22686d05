#!/usr/bin/env bash
# Build AWS's Node Termination Handler (NTH) v1.25.0 from the Go module proxy, once, cached
# outside the checkout. The benchmark runs it beside spotguard on the AWS profile (scenarios `nth`
# and `nth_drain`, spotguard_sim.bench.nth), so the comparison is with the real binary, not only
# with our re-implementation of its behaviour (`evict_immediately`).
#
# The Go checksum database has no entry for this version (its lookup answers 404), so the module is
# fetched with GONOSUMDB for it alone and its hash checked here against the one pinned below: what
# the Go module proxy served on 2026-12-01 (not checked against GitHub's tag: GitHub is not
# reachable from here). Its dependencies are checked by the module's own go.sum as usual.
#
#   scripts/install-nth.sh          build if needed (progress on stderr)
#   scripts/install-nth.sh --print  print the binary's path and exit (1 when not built)
set -euo pipefail

MODULE=github.com/aws/aws-node-termination-handler
VERSION=v1.25.0
PINNED_SUM="h1:PaNjFYokT70al0SLzdHzX4HPGeJkVqmHnKWoz+A+JUk="
command -v go >/dev/null || { echo "install-nth: Go is required (module proxy)" >&2; exit 1; }
CACHE=${SPOTGUARD_CACHE_DIR:-$HOME/.cache/spotguard}
DIR=$CACHE/nth-$VERSION-$(go env GOVERSION)
BINARY=$DIR/node-termination-handler

if [[ ${1:-} == --print ]]; then
    [[ -x $BINARY ]] || exit 1
    echo "$BINARY"
    exit 0
fi
if [[ ! -x $BINARY ]]; then
    echo "install-nth: building $MODULE $VERSION from the Go module proxy (nice 19; cached in $DIR)" >&2
    start=$SECONDS
    info=$(cd / && GONOSUMDB=$MODULE go mod download -json "$MODULE@$VERSION")
    sum=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["Sum"])' <<<"$info")
    source_dir=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])' <<<"$info")
    if [[ $sum != "$PINNED_SUM" ]]; then
        echo "install-nth: $MODULE@$VERSION has hash $sum, not the pinned $PINNED_SUM; refusing to build" >&2
        exit 1
    fi
    rm -rf "$DIR.partial" && mkdir -p "$DIR.partial"
    # Built in the (read-only) module directory with its own go.mod and go.sum.
    (cd "$source_dir" && GONOSUMDB=$MODULE GOFLAGS=-mod=readonly CGO_ENABLED=0 nice -n 19 \
        go build -trimpath -ldflags '-s -w' -o "$DIR.partial/node-termination-handler" ./cmd)
    rm -rf "$DIR" && mv "$DIR.partial" "$DIR"
    find "$CACHE" -maxdepth 1 -name "nth-*" ! -name "$(basename "$DIR")" -exec rm -rf {} +
    echo "install-nth: built in $((SECONDS - start)) s" >&2
fi
