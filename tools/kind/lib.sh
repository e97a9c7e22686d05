# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts sourcing this
# Shared by tools/kind/setup.sh and tools/kind/cluster.sh: versions, names, paths, helpers.

# Every version here is served by the Go module proxy and builds with the local Go toolchain.
KIND_VERSION=v0.33.0
KUBERNETES_VERSION=v1.36.3            # tools/kind/kubernetes/go.mod (also pins etcd server v3.6.8)
ETCD_IMAGE_TAG=3.6.8-0                # what kubeadm 1.36 asks for; checked against kubeadm at build time
COREDNS_VERSION=v1.14.2
CONTAINERD_VERSION=v2.3.4
RUNC_VERSION=v1.4.3
CRICTL_VERSION=v1.36.0
LOCAL_PATH_PROVISIONER_VERSION=v0.0.30

DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=${SPOTGUARD_KIND_DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SECURITY_MIRROR=${SPOTGUARD_KIND_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

CACHE=${SPOTGUARD_KIND_CACHE:-$HOME/.cache/spotguard/kind}
LIBEXEC=/usr/local/libexec/spotguard-kind

# Images this tooling builds (all local; nothing is ever pulled).
ROOT_IMAGE=spotguard-kind/debian:$DEBIAN_SUITE
KUBERNETES_IMAGE=spotguard-kind/kubernetes:$KUBERNETES_VERSION
BASE_IMAGE=spotguard-kind/base:$KUBERNETES_VERSION
NODE_IMAGE=spotguard-kind/node:$KUBERNETES_VERSION
CNI_IMAGE=spotguard-kind/cni:1        # referenced by tools/kind/cni.yaml
PYTHON_IMAGE=spotguard-python:3.11-bookworm
SPOTGUARD_IMAGE=spotguard:dev        # spotguard_sim.kindbench.IMAGE
# Every image built here carries this label; its value is a hash of the image's build inputs.
INPUTS_LABEL=io.spotguard.kind.inputs

CLUSTER_NAME=${SPOTGUARD_KIND_CLUSTER:-spotguard}
POD_SUBNET=10.244.0.0/16

say() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# kind_module_dir: where the kind module (and its images/base/files) sits in the Go module cache.
kind_module_dir() {
    local dir
    dir=$(go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])') ||
        die "could not download sigs.k8s.io/kind@$KIND_VERSION from the Go module proxy"
    printf '%s\n' "$dir"
}

# image_label IMAGE: the inputs label of a local image, empty when the image is missing.
image_label() {
    docker image inspect -f "{{index .Config.Labels \"$INPUTS_LABEL\"}}" "$1" 2>/dev/null || true
}

# image_id IMAGE: the local image's ID (fails when missing).
image_id() {
    docker image inspect -f '{{.Id}}' "$1"
}
