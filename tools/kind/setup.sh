#!/usr/bin/env bash
# tools/kind/setup.sh: everything a kind cluster needs, built offline on this machine.
#
# No container registry is reachable here, so nothing is pulled: the Debian mirror (apt,
# debootstrap), PyPI (only for spotguard's own image) and the Go module proxy are the only sources.
#   1. Docker engine: Debian's docker.io, started in the background when not running; on hosts
#      whose capability bounding set is incomplete, an OCI runtime wrapper (runc-capfilter)
#      becomes dockerd's default runtime so `docker run --privileged` works.
#   2. Go binaries from the Go module proxy, at nice 19, cached under $CACHE/<component>-<version>-<hash>:
#      kind; Kubernetes (one multi-call binary: kubelet, kubeadm, kubectl, kube-proxy,
#      kube-apiserver, kube-controller-manager, kube-scheduler, etcd); containerd, runc, crictl;
#      CoreDNS; local-path-provisioner. Plus the pause binary (C, gcc -static).
#   3. Images, all local: a debootstrap Debian root image under everything, the component images
#      tagged as kubeadm expects, the kind base image and the kind node image.
#   4. spotguard-python:3.11-bookworm, a local base for the project's Dockerfile
#      (docker build --build-arg PYTHON_IMAGE=spotguard-python:3.11-bookworm .).
#   5. spotguard's own image, spotguard:dev, from this checkout's Dockerfile on that base (Docker's
#      layer cache makes it a no-op when spotguard/ is unchanged; the kind tests rebuild it too,
#      so they always run the code under test).
#   6. kind and kubectl linked into /usr/local/bin.
# Idempotent: each step is skipped when its inputs are unchanged (binaries by cache directory,
# images by the io.spotguard.kind.inputs label), so a second run is a quick no-op.
#
# Usage: tools/kind/setup.sh      (as root; environment: SPOTGUARD_KIND_CACHE,
#                                  SPOTGUARD_KIND_DEBIAN_MIRROR, SPOTGUARD_KIND_DEBIAN_SECURITY_MIRROR)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=tools/kind/lib.sh
source "$HERE/lib.sh"

[[ $(id -u) == 0 ]] || die "run as root: it installs packages, runs dockerd and debootstrap"
command -v go >/dev/null || die "a Go toolchain is needed (go not on PATH)"
mkdir -p "$CACHE/logs"
exec 9>"$CACHE/.setup.lock"
flock 9

START=$SECONDS
# Docker's classic builder: BuildKit would try to pull its Dockerfile frontend (the project's
# Dockerfile has a `# syntax=` line), and Debian's dockerd has no buildx.
export DOCKER_BUILDKIT=0

# run_logged LOG COMMAND...: run (in a subshell) quietly, appending to a log file; on failure
# show the log's end.
run_logged() {
    local log=$1
    shift
    if ! ("$@") >>"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "failed: $* (full log: $log)"
    fi
}

hash_stdin() { sha256sum | cut -c1-16; }

###############################################################################################
# 1. Docker engine
###############################################################################################

ensure_packages() {
    local wanted=(docker.io containerd runc iptables debootstrap libseccomp-dev pkg-config gcc libc6-dev
        python3 ca-certificates)
    local missing=() package
    for package in "${wanted[@]}"; do
        dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
    done
    if ((${#missing[@]})); then
        say "installing Debian packages: ${missing[*]}"
        # through the project's apt lock: ./dev test installs Prometheus in the foreground meanwhile
        run_logged "$CACHE/logs/apt.log" bash "$REPO_ROOT/scripts/apt-install.sh" "${missing[@]}"
    fi
}

# host_lacks_capabilities: true when this host's capability bounding set misses a capability the
# kernel knows (then Docker's privileged containers fail without the wrapper).
host_lacks_capabilities() {
    local last bounding
    last=$(cat /proc/sys/kernel/cap_last_cap)
    bounding=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
    (((16#$bounding & ((1 << (last + 1)) - 1)) != ((1 << (last + 1)) - 1)))
}

# start_dockerd: dockerd in its own session, detached, holding none of this script's descriptors
# (the setup lock, the caller's pipes): nothing waits for it and it keeps no one waiting.
start_dockerd() {
    (
        cd /
        local fd
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if ((fd > 2)); then eval "exec $fd>&-" 2>/dev/null || true; fi
        done
        exec setsid -f dockerd >>"$CACHE/dockerd.log" 2>&1 </dev/null
    )
}

ensure_docker() {
    local wrapper="" mtu="" iface changed
    if host_lacks_capabilities; then
        wrapper=$LIBEXEC/runc-capfilter
        if ! cmp -s "$HERE/runc-capfilter" "$wrapper"; then
            say "installing the OCI runtime wrapper $wrapper (this host's capability bounding set is incomplete)"
            install -D -m 0755 "$HERE/runc-capfilter" "$wrapper"
        fi
    fi
    iface=$(ip -4 route show default 2>/dev/null | awk '{print $5; exit}')
    if [[ -n $iface && -r /sys/class/net/$iface/mtu ]] && (($(cat "/sys/class/net/$iface/mtu") < 1500)); then
        mtu=$(cat "/sys/class/net/$iface/mtu")
    fi
    mkdir -p /etc/docker
    changed=$(python3 - /etc/docker/daemon.json "$wrapper" "$mtu" <<'EOF'
import json, os, sys
path, wrapper, mtu = sys.argv[1:]
config = json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else {}
before = json.dumps(config, sort_keys=True)
if wrapper:
    config.setdefault("runtimes", {})["capfilter"] = {"path": wrapper}
    config["default-runtime"] = "capfilter"
if mtu:
    config.setdefault("mtu", int(mtu))  # bridge networks (and kind's) use the uplink's smaller MTU
if json.dumps(config, sort_keys=True) != before:
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print("changed")
EOF
    )
    [[ -z $changed ]] || say "updated /etc/docker/daemon.json (runtime wrapper: ${wrapper:-none}, mtu: ${mtu:-default})"

    if docker info >/dev/null 2>&1; then
        if [[ -n $changed && -f /var/run/docker.pid ]]; then
            say "asking the running dockerd to reload its configuration (SIGHUP)"
            kill -HUP "$(cat /var/run/docker.pid)"
            sleep 2
        fi
    else
        if [[ -d /run/systemd/system ]]; then
            say "starting dockerd (systemctl start docker)"
            systemctl start docker
        else
            say "starting dockerd in the background (log: $CACHE/dockerd.log)"
            start_dockerd
        fi
        for _ in $(seq 60); do
            docker info >/dev/null 2>&1 && break
            sleep 1
        done
        docker info >/dev/null 2>&1 || die "dockerd did not come up; see $CACHE/dockerd.log"
    fi
    if [[ -n $wrapper ]] && [[ $(docker info -f '{{.DefaultRuntime}}') != capfilter ]]; then
        die "dockerd does not use the capfilter runtime; restart dockerd to load /etc/docker/daemon.json"
    fi
    say "Docker engine: $(docker version -f 'server {{.Server.Version}}, client {{.Client.Version}}'), default runtime $(docker info -f '{{.DefaultRuntime}}')"
}

###############################################################################################
# 2. Binaries: Go module proxy only, nice 19, cached by version and a hash of the build inputs
###############################################################################################

declare -A BUILT

# cached_build NAME VERSION DESCRIPTION FUNCTION [KEY-FILE...]: run FUNCTION OUTDIR once per
# (version, Go version, FUNCTION's own definition, content of KEY-FILEs); BUILT[NAME]=the dir.
cached_build() {
    local name=$1 version=$2 description=$3 build=$4
    shift 4
    local key dir start
    key=$({
        go version
        gcc --version | head -n 1
        declare -f "$build"
        cat "$@" </dev/null
    } | hash_stdin)
    dir=$CACHE/$name-$version-$key
    BUILT[$name]=$dir
    if [[ -f $dir/.complete ]]; then
        say "$description: cached ($dir)"
        return
    fi
    say "building $description (nice 19; cached after the first time)"
    start=$SECONDS
    rm -rf "$dir.partial"
    mkdir -p "$dir.partial"
    : >"$CACHE/logs/$name.log"
    run_logged "$CACHE/logs/$name.log" "$build" "$dir.partial"
    touch "$dir.partial/.complete"
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
    find "$CACHE" -maxdepth 1 -name "$name-*" ! -name "$(basename "$dir")" -exec rm -rf {} +
    say "  $name built in $((SECONDS - start)) s"
}

# The go commands run outside any module (go install pkg@version uses the module's own go.mod).
build_kind() {
    cd / && GOBIN=$1 CGO_ENABLED=0 nice -n 19 go install -trimpath -ldflags '-s -w' "sigs.k8s.io/kind@$KIND_VERSION"
}

build_kubernetes() {
    local v=$KUBERNETES_VERSION major minor ldflags="-s -w" pkg
    major=${v#v}
    minor=${major#*.}
    major=${major%%.*}
    minor=${minor%%.*}
    # kubeadm compares versions: stamp the release into component-base and client-go.
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    cd "$HERE/kubernetes" && CGO_ENABLED=0 nice -n 19 go build -v -trimpath -buildvcs=false \
        -ldflags "$ldflags" -o "$1/kubernetes" .
}

build_containerd() {
    local m=github.com/containerd/containerd/v2
    local ldflags="-s -w -X $m/version.Version=$CONTAINERD_VERSION -X $m/version.Package=$m"
    local tags="urfave_cli_no_docs no_btrfs no_devmapper no_zfs"
    cd / && GOBIN=$1 CGO_ENABLED=0 nice -n 19 go install -trimpath -tags "$tags" -ldflags "$ldflags" \
        "$m/cmd/containerd@$CONTAINERD_VERSION" "$m/cmd/ctr@$CONTAINERD_VERSION"
    # containerd's Makefile builds the shim without the gRPC server
    GOBIN=$1 CGO_ENABLED=0 nice -n 19 go install -trimpath -tags "$tags no_grpc" -ldflags "$ldflags" \
        "$m/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION"
}

build_runc() {
    # cgo with libseccomp (Debian's libseccomp-dev here, libseccomp2 in the node image)
    cd / && GOBIN=$1 CGO_ENABLED=1 nice -n 19 go install -trimpath -tags "seccomp urfave_cli_no_docs" \
        -ldflags '-s -w' "github.com/opencontainers/runc@$RUNC_VERSION"
}

build_crictl() {
    cd / && GOBIN=$1 CGO_ENABLED=0 nice -n 19 go install -trimpath \
        -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=${CRICTL_VERSION#v}" \
        "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
}

build_coredns() {
    cd / && GOBIN=$1 CGO_ENABLED=0 nice -n 19 go install -trimpath -ldflags '-s -w' \
        "github.com/coredns/coredns@$COREDNS_VERSION"
}

build_local_path_provisioner() {
    cd / && GOBIN=$1 CGO_ENABLED=0 nice -n 19 go install -trimpath \
        -ldflags "-s -w -X main.VERSION=$LOCAL_PATH_PROVISIONER_VERSION" \
        "github.com/rancher/local-path-provisioner@$LOCAL_PATH_PROVISIONER_VERSION"
}

build_pause() {
    nice -n 19 gcc -Os -s -static -Wall -Wextra -Werror -o "$1/pause" "$HERE/pause/pause.c"
}

build_binaries() {
    cached_build kind "$KIND_VERSION" "kind" build_kind
    cached_build kubernetes "$KUBERNETES_VERSION" \
        "Kubernetes $KUBERNETES_VERSION: kubelet, kubeadm, kubectl, kube-proxy, kube-apiserver, kube-controller-manager, kube-scheduler and etcd (one multi-call binary)" \
        build_kubernetes "$HERE/kubernetes/go.mod" "$HERE/kubernetes/go.sum" "$HERE/kubernetes/main.go"
    cached_build containerd "$CONTAINERD_VERSION" "containerd $CONTAINERD_VERSION (containerd, ctr, containerd-shim-runc-v2)" build_containerd
    cached_build runc "$RUNC_VERSION" "runc $RUNC_VERSION" build_runc
    cached_build crictl "$CRICTL_VERSION" "crictl $CRICTL_VERSION" build_crictl
    cached_build coredns "$COREDNS_VERSION" "CoreDNS $COREDNS_VERSION" build_coredns
    cached_build local-path-provisioner "$LOCAL_PATH_PROVISIONER_VERSION" "local-path-provisioner $LOCAL_PATH_PROVISIONER_VERSION" build_local_path_provisioner
    cached_build pause 1 "pause (C)" build_pause "$HERE/pause/pause.c"
    KUBE=${BUILT[kubernetes]}/kubernetes
}

###############################################################################################
# 3. Images
###############################################################################################

# stage NAME: a fresh build-context directory; echo its path.
stage() {
    local dir=$CACHE/contexts/$1
    rm -rf "$dir"
    mkdir -p "$dir"
    printf '%s\n' "$dir"
}

# link_multicall DIR NAME...: hard-link the Kubernetes binary into DIR with a symlink per NAME.
link_multicall() {
    local dir=$1 name
    shift
    mkdir -p "$dir"
    ln -f "$KUBE" "$dir/kubernetes" 2>/dev/null || cp "$KUBE" "$dir/kubernetes"
    for name in "$@"; do
        ln -sf kubernetes "$dir/$name"
    done
}

# build_image TAG CONTEXT [--parent IMAGE]... [docker build options]: build unless TAG already
# carries the hash of this context, these options and the parents' IDs.
build_image() {
    local tag=$1 context=$2
    shift 2
    local parents=() options=() key start previous
    while (($#)); do
        if [[ $1 == --parent ]]; then
            parents+=("$2")
            shift 2
        else
            options+=("$1")
            shift
        fi
    done
    key=$({
        tar -C "$context" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - .
        printf '%s\n' "${options[@]}"
        local parent
        for parent in "${parents[@]}"; do image_id "$parent"; done
    } | hash_stdin)
    if [[ $(image_label "$tag") == "$key" ]]; then
        say "image $tag: up to date"
        return
    fi
    say "building image $tag"
    previous=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
    start=$SECONDS
    : >"$CACHE/logs/image-${tag//[\/:]/_}.log"
    run_logged "$CACHE/logs/image-${tag//[\/:]/_}.log" \
        docker build --network host --label "$INPUTS_LABEL=$key" -t "$tag" "${options[@]}" "$context"
    remove_replaced "$previous" "$tag"
    say "  $tag built in $((SECONDS - start)) s ($(image_size "$tag"))"
}

# remove_replaced OLD-ID TAG: drop the image a rebuild of TAG replaced, unless still in use.
remove_replaced() {
    if [[ -n $1 && $1 != $(image_id "$2") ]]; then
        docker rmi "$1" >/dev/null 2>&1 || true
    fi
}

image_size() {
    docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1000000}'
}

# retag TAG PARENT ENTRYPOINT: a metadata-only image (same layers as PARENT, own entrypoint).
retag() {
    local tag=$1 parent=$2 entrypoint=$3 context
    context=$(stage "retag-${tag//[\/:]/_}")
    # shellcheck disable=SC2016  # ${PARENT} is for docker build
    printf 'ARG PARENT\nFROM ${PARENT}\nENTRYPOINT %s\n' "$entrypoint" >"$context/Dockerfile"
    build_image "$tag" "$context" --parent "$parent" --build-arg "PARENT=$parent"
}

build_root_image() {
    local key dir rootfs
    key=$({
        printf '%s\n' "$DEBIAN_SUITE" "$DEBIAN_MIRROR" "$DEBIAN_SECURITY_MIRROR"
        declare -f build_root_image
    } | hash_stdin)
    if [[ $(image_label "$ROOT_IMAGE") == "$key" ]]; then
        say "image $ROOT_IMAGE: up to date"
        return
    fi
    dir=$CACHE/rootfs-$DEBIAN_SUITE-$key
    if [[ ! -f $dir/rootfs.tar.gz ]]; then
        say "debootstrap: Debian $DEBIAN_SUITE minbase root filesystem from $DEBIAN_MIRROR (nice 19)"
        local start=$SECONDS
        rootfs=$CACHE/rootfs.partial
        rm -rf "$rootfs" "$dir"
        : >"$CACHE/logs/debootstrap.log"
        run_logged "$CACHE/logs/debootstrap.log" \
            nice -n 19 debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR"
        cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR $DEBIAN_SUITE main
deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main
deb $DEBIAN_SECURITY_MIRROR $DEBIAN_SUITE-security main
EOF
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
            "$rootfs"/tmp/* "$rootfs/etc/hostname" "$rootfs/etc/machine-id"
        : >"$rootfs/etc/resolv.conf"
        mkdir -p "$dir"
        tar -C "$rootfs" --numeric-owner -cf - . | nice -n 19 gzip -1 >"$dir/rootfs.tar.gz.partial"
        mv "$dir/rootfs.tar.gz.partial" "$dir/rootfs.tar.gz"
        rm -rf "$rootfs"
        find "$CACHE" -maxdepth 1 -name "rootfs-$DEBIAN_SUITE-*" ! -name "$(basename "$dir")" -exec rm -rf {} +
        say "  root filesystem in $((SECONDS - start)) s"
    fi
    say "importing $ROOT_IMAGE"
    local previous
    previous=$(docker image inspect -f '{{.Id}}' "$ROOT_IMAGE" 2>/dev/null || true)
    docker import --change "LABEL $INPUTS_LABEL=$key" --change 'CMD ["bash"]' "$dir/rootfs.tar.gz" "$ROOT_IMAGE" >/dev/null
    remove_replaced "$previous" "$ROOT_IMAGE"
}

check_privileged_containers() {
    docker run --rm --privileged --network none "$ROOT_IMAGE" true 2>"$CACHE/logs/privileged.log" ||
        die "docker run --privileged fails here: $(cat "$CACHE/logs/privileged.log")"
}

# Which images does this kubeadm want? Sets KUBEADM_IMAGES[component]=tag.
declare -A KUBEADM_IMAGES
read_kubeadm_images() {
    local image name
    while read -r image; do
        name=${image%:*}
        name=${name##*/}
        KUBEADM_IMAGES[$name]=$image
    done < <("$KUBE" kubeadm config images list --kubernetes-version "$KUBERNETES_VERSION" 2>/dev/null)
    for name in kube-apiserver kube-controller-manager kube-scheduler kube-proxy etcd coredns pause; do
        [[ -n ${KUBEADM_IMAGES[$name]:-} ]] || die "kubeadm config images list did not name a $name image"
    done
    [[ ${KUBEADM_IMAGES[etcd]} == *:$ETCD_IMAGE_TAG ]] ||
        die "kubeadm wants ${KUBEADM_IMAGES[etcd]}, lib.sh expects etcd $ETCD_IMAGE_TAG: update tools/kind"
    [[ ${KUBEADM_IMAGES[coredns]} == *:$COREDNS_VERSION ]] ||
        die "kubeadm wants ${KUBEADM_IMAGES[coredns]}, lib.sh builds CoreDNS $COREDNS_VERSION: update tools/kind"
}

# The storage (and default CNI) images kind's node-image build requires, from kind's source.
read_kind_images() {
    local nodeimage=$KIND_DIR/pkg/build/nodeimage
    LPP_IMAGE=$(grep -ho 'docker.io/kindest/local-path-provisioner:[^"]*' "$nodeimage/const_storage.go" | head -n 1)
    LPP_HELPER_IMAGE=$(grep -ho 'docker.io/kindest/local-path-helper:[^"]*' "$nodeimage/const_storage.go" | head -n 1)
    KINDNETD_IMAGE=$(grep -ho 'docker.io/kindest/kindnetd:[^"]*' "$nodeimage/const_cni.go" | head -n 1)
    [[ -n $LPP_IMAGE && -n $LPP_HELPER_IMAGE && -n $KINDNETD_IMAGE ]] || die "could not read kind's image names from $nodeimage"
}

build_component_images() {
    local context component
    context=$(stage kubernetes)
    cp "$HERE/images/kubernetes/Dockerfile" "$HERE/images/kubernetes/iptables-wrapper" "$context/"
    link_multicall "$context/bin" kubelet kubeadm kubectl kube-proxy kube-apiserver kube-controller-manager kube-scheduler etcd
    build_image "$KUBERNETES_IMAGE" "$context" --parent "$ROOT_IMAGE" --build-arg "ROOT_IMAGE=$ROOT_IMAGE"

    for component in kube-apiserver kube-controller-manager kube-scheduler kube-proxy etcd; do
        retag "${KUBEADM_IMAGES[$component]}" "$KUBERNETES_IMAGE" "[\"/usr/local/bin/$component\"]"
    done

    context=$(stage coredns)
    cp "$HERE/images/coredns/Dockerfile" "$context/"
    ln "${BUILT[coredns]}/coredns" "$context/coredns"
    build_image "${KUBEADM_IMAGES[coredns]}" "$context" --parent "$ROOT_IMAGE" --build-arg "ROOT_IMAGE=$ROOT_IMAGE"

    context=$(stage pause)
    cp "$HERE/images/pause/Dockerfile" "$context/"
    ln "${BUILT[pause]}/pause" "$context/pause"
    build_image "${KUBEADM_IMAGES[pause]}" "$context"

    context=$(stage local-path-provisioner)
    cp "$HERE/images/local-path-provisioner/Dockerfile" "$context/"
    ln "${BUILT[local-path-provisioner]}/local-path-provisioner" "$context/local-path-provisioner"
    build_image "$LPP_IMAGE" "$context" --parent "$ROOT_IMAGE" --build-arg "ROOT_IMAGE=$ROOT_IMAGE"
    # The helper pods only need sh, mkdir and rm: the Debian root image has them.
    retag "$LPP_HELPER_IMAGE" "$ROOT_IMAGE" '["/bin/sh"]'

    context=$(stage cni)
    cp "$HERE/images/cni/Dockerfile" "$HERE/images/cni/spotguard-kind-cni" "$context/"
    build_image "$CNI_IMAGE" "$context" --parent "$KUBERNETES_IMAGE" --build-arg "KUBERNETES_IMAGE=$KUBERNETES_IMAGE"
}

build_python_image() {
    local context
    context=$(stage python)
    cp "$HERE/images/python/Dockerfile" "$context/"
    mkdir -p "$context/extra-ca-certificates"
    # This host's own extra CAs (e.g. a TLS-inspecting egress proxy): pip in the image must
    # trust what the host trusts to reach PyPI. Only what the host already has, never fetched.
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$context/extra-ca-certificates/"
    fi
    build_image "$PYTHON_IMAGE" "$context" --parent "$ROOT_IMAGE" --build-arg "ROOT_IMAGE=$ROOT_IMAGE"
}

build_base_image() {
    local context
    context=$(stage base)
    cp "$HERE/images/base/Dockerfile" "$context/"
    # kind's own node files, from the kind module (read-only in the module cache).
    cp -r "$KIND_DIR/images/base/files" "$context/kind"
    chmod -R u+w "$context/kind"
    find "$context/kind" -type d -exec chmod 0755 {} +
    find "$context/kind" -type f -exec chmod 0644 {} +
    chmod 0755 "$context"/kind/usr/local/bin/* "$context"/kind/kind/bin/*
    cp -r "$HERE/images/base/files" "$context/files"
    mkdir -p "$context/bin/bin" "$context/bin/sbin"
    ln "${BUILT[containerd]}"/{containerd,ctr,containerd-shim-runc-v2} "${BUILT[crictl]}/crictl" "$context/bin/bin/"
    ln "${BUILT[runc]}/runc" "$context/bin/sbin/runc"
    link_multicall "$context/bin/bin" kubelet kubeadm kubectl
    build_image "$BASE_IMAGE" "$context" --parent "$ROOT_IMAGE" \
        --build-arg "ROOT_IMAGE=$ROOT_IMAGE" --build-arg "SANDBOX_IMAGE=${KUBEADM_IMAGES[pause]}"
}

# The node image, through `kind build node-image --type file`: a Kubernetes "server" tarball
# whose kubeadm/kubelet/kubectl are launchers for the binary already in the base image, and whose
# kube-apiserver.tar carries every image the node needs. kind pulls any required image it does
# not find among those tarballs' tags, so kube-apiserver.tar starts with a `repositories` entry
# naming them all (see repack-images.py).
build_node_image() {
    local images=() image key start dir bin previous
    images=("${KUBEADM_IMAGES[kube-apiserver]}" "${KUBEADM_IMAGES[kube-controller-manager]}"
        "${KUBEADM_IMAGES[kube-scheduler]}" "${KUBEADM_IMAGES[kube-proxy]}" "${KUBEADM_IMAGES[etcd]}"
        "${KUBEADM_IMAGES[coredns]}" "${KUBEADM_IMAGES[pause]}" "$LPP_IMAGE" "$LPP_HELPER_IMAGE" "$CNI_IMAGE")
    key=$({
        printf '%s\n' "$KIND_VERSION" "$KUBERNETES_VERSION" "$KINDNETD_IMAGE" "${images[@]}"
        image_id "$BASE_IMAGE"
        for image in "${images[@]}"; do image_id "$image"; done
        declare -f build_node_image
        cat "$HERE/repack-images.py"
    } | hash_stdin)
    if [[ $(image_label "$NODE_IMAGE") == "$key" ]]; then
        say "image $NODE_IMAGE: up to date"
        return
    fi
    say "building the kind node image $NODE_IMAGE (kind build node-image --type file)"
    start=$SECONDS
    previous=$(docker image inspect -f '{{.Id}}' "$NODE_IMAGE" 2>/dev/null || true)
    dir=$CACHE/node-build
    rm -rf "$dir"
    : >"$CACHE/logs/node-image.log"
    bin=$dir/kubernetes/server/bin
    mkdir -p "$bin"
    printf '%s\n' "$KUBERNETES_VERSION" >"$dir/kubernetes/version"
    for image in kubelet kubeadm kubectl; do
        printf '#!/bin/sh\n# kind copies this launcher to /usr/bin/%s; the binary is in the base image.\nexec /usr/local/bin/%s "$@"\n' \
            "$image" "$image" >"$bin/$image"
        chmod 0755 "$bin/$image"
    done
    say "  saving ${#images[@]} images"
    run_logged "$CACHE/logs/node-image.log" docker save -o "$dir/all-images.tar" "${images[@]}"
    run_logged "$CACHE/logs/node-image.log" python3 "$HERE/repack-images.py" "$dir/all-images.tar" \
        "$bin/kube-apiserver.tar" --declare "$KINDNETD_IMAGE"
    rm -f "$dir/all-images.tar"
    # kind imports each of these too: each holds its own image (layers shared, stored once).
    for image in kube-controller-manager kube-scheduler kube-proxy; do
        run_logged "$CACHE/logs/node-image.log" docker save -o "$bin/$image.tar" "${KUBEADM_IMAGES[$image]}"
    done
    tar -C "$dir" -cf - kubernetes | nice -n 19 gzip -1 >"$dir/kubernetes-server-linux-amd64.tar.gz"
    rm -rf "$dir/kubernetes"
    say "  kind build node-image (kind first tries to pull the base image, ~10 s of harmless retries)"
    # kind extracts the tarball under $TMPDIR and leaves it there: keep that inside $dir.
    mkdir -p "$dir/tmp"
    run_logged "$CACHE/logs/node-image.log" env TMPDIR="$dir/tmp" "${BUILT[kind]}/kind" build node-image --type file \
        --base-image "$BASE_IMAGE" --image "$NODE_IMAGE-unlabelled" "$dir/kubernetes-server-linux-amd64.tar.gz"
    # shellcheck disable=SC2016  # ${PARENT} is for docker build
    printf 'ARG PARENT\nFROM ${PARENT}\n' | run_logged "$CACHE/logs/node-image.log" \
        docker build --label "$INPUTS_LABEL=$key" --build-arg "PARENT=$NODE_IMAGE-unlabelled" -t "$NODE_IMAGE" -
    docker rmi "$NODE_IMAGE-unlabelled" >/dev/null
    remove_replaced "$previous" "$NODE_IMAGE"
    rm -rf "$dir"
    say "  $NODE_IMAGE built in $((SECONDS - start)) s ($(image_size "$NODE_IMAGE"))"
}

###############################################################################################

# The product image as users build it: the real Dockerfile, on the local Python base instead of
# the registry's (its PYTHON_IMAGE build-arg).
build_spotguard_image() {
    local start=$SECONDS
    say "building $SPOTGUARD_IMAGE from $REPO_ROOT/Dockerfile (PYTHON_IMAGE=$PYTHON_IMAGE)"
    # A Dockerfile that does not build is the product's failure, not the set-up's: the kind tests
    # build the image again and fail on it, where it shows (a failed set-up would make them skip).
    if ! docker build --network host --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" -t "$SPOTGUARD_IMAGE" "$REPO_ROOT" \
        >>"$CACHE/logs/spotguard-image.log" 2>&1; then
        warn "$SPOTGUARD_IMAGE did not build (log: $CACHE/logs/spotguard-image.log); the kind tests will say why"
        return 0
    fi
    say "  $SPOTGUARD_IMAGE in $((SECONDS - start)) s ($(image_size "$SPOTGUARD_IMAGE"), user $(docker image inspect -f '{{.Config.User}}' "$SPOTGUARD_IMAGE"))"
}

link_tools() {
    ln -sfn "${BUILT[kind]}/kind" /usr/local/bin/kind
    ln -sfn "$KUBE" /usr/local/bin/kubectl
    say "kind: /usr/local/bin/kind -> ${BUILT[kind]}/kind ($(kind version))"
    say "kubectl: /usr/local/bin/kubectl -> $KUBE ($(/usr/local/bin/kubectl version --client 2>/dev/null | head -n 1))"
}

main() {
    ensure_packages
    ensure_docker
    KIND_DIR=$(cd / && kind_module_dir)
    build_binaries
    read_kubeadm_images
    read_kind_images
    build_root_image
    check_privileged_containers
    build_component_images
    build_python_image
    build_base_image
    build_node_image
    build_spotguard_image
    link_tools
    say "done in $((SECONDS - START)) s: node image $NODE_IMAGE, Python base $PYTHON_IMAGE, $SPOTGUARD_IMAGE; next: tools/kind/cluster.sh up"
}

main "$@"
