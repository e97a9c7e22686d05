#!/usr/bin/env bash
# Build AWS's own EC2 metadata mock (amazon-ec2-metadata-mock, "AEMM") from the Go module proxy,
# once, cached outside the checkout. tests/integration/test_aws_aemm.py runs spotguard's AWS
# provider against it, so the provider is proven against a mock this project did not write.
#
#   scripts/install-aemm.sh          build if needed (progress on stderr)
#   scripts/install-aemm.sh --print  print the binary's path and exit (1 when not built)
set -euo pipefail

VERSION=v1.13.0
command -v go >/dev/null || { echo "install-aemm: Go is required (go install from the module proxy)" >&2; exit 1; }
CACHE=${SPOTGUARD_CACHE_DIR:-$HOME/.cache/spotguard}
DIR=$CACHE/aemm-$VERSION-$(go env GOVERSION)
BINARY=$DIR/ec2-metadata-mock

if [[ ${1:-} == --print ]]; then
    [[ -x $BINARY ]] || exit 1
    echo "$BINARY"
    exit 0
fi
if [[ ! -x $BINARY ]]; then
    echo "install-aemm: building amazon-ec2-metadata-mock $VERSION from the Go module proxy (nice 19; cached in $DIR)" >&2
    start=$SECONDS
    rm -rf "$DIR.partial" && mkdir -p "$DIR.partial"
    # Outside any module: `go install pkg@version` builds with the module's own go.mod and go.sum,
    # checked against the Go checksum database.
    (cd / && GOBIN=$DIR.partial CGO_ENABLED=0 nice -n 19 go install -trimpath -ldflags '-s -w' \
        "github.com/aws/amazon-ec2-metadata-mock/cmd/ec2-metadata-mock@$VERSION")
    rm -rf "$DIR" && mv "$DIR.partial" "$DIR"
    find "$CACHE" -maxdepth 1 -name "aemm-*" ! -name "$(basename "$DIR")" -exec rm -rf {} +
    echo "install-aemm: built in $((SECONDS - start)) s" >&2
fi
