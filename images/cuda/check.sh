#!/usr/bin/env bash
# `make image-train-check`: the CUDA training image users pull, built from Dockerfile.train with PyPI's CUDA torch
# and inspected offline, with no GPU (docs/development.md, "Before a release"). Not part of CI: from nothing it takes
# about 20 minutes and downloads 2.8 GB (docs/images.md, "The CUDA image, built and inspected").
#   1. the CUDA wheelhouse: what pip picks on PyPI for CPython 3.11 on manylinux x86-64 (torch==2.13.0 is the CUDA 13
#      build there; this machine's pip config, which offers a local CPU torch, is bypassed)
#   2. Dockerfile.train built unchanged but for its base (the local stand-in of python:3.11-slim-bookworm that
#      images/local/build.sh makes: no registry is reachable here) and the wheelhouse, mounted at /wheels-cuda
#      (a path of its own: podman's layer cache keys on the command and its build arguments, not on the
#      mounted files, so the CPU lane's /wheels layer must not be reused)
#   3. images/cuda/probe.py inside the image, as its user, on a read-only root with only /tmp writable and no
#      network: torch.version.cuda, every shared library resolves but the driver's, Triton compiles for sm_90/sm_100
#   4. the compressed size (gzip layers, as a registry stores them) into benchmarks/results/images-cuda.json,
#      which `make docs` puts in docs/images.md
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${PYTHON:=.venv-train/bin/python}"
: "${IMAGE:=localhost/tuneserve-train:cuda}"
: "${WHEELS:=build/wheels/train-cuda}"
: "${WORK:=build/image-cuda}"
RESULT=benchmarks/results/images-cuda.json
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
PYTHON_IMAGE=localhost/tuneserve-python:3.11-bookworm
export CONTAINERS_CONF="$PWD/images/local/containers.conf"
export BUILDAH_ISOLATION=chroot
mkdir -p "$WORK"
t0=$(date +%s)
step() { printf '\n== %s (%s, %d s)\n' "$1" "$(date +%T)" "$(($(date +%s) - t0))" >&2; }
declare -A seconds

step "stand-in base $PYTHON_IMAGE"
s=$(date +%s)
if ! podman image exists "$PYTHON_IMAGE"; then
    if ! podman image exists localhost/debian:bookworm; then
        rootfs=$(mktemp -d)
        trap 'rm -rf "$rootfs"' EXIT
        debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
        tar -C "$rootfs" -c . | podman import - localhost/debian:bookworm
        rm -rf "$rootfs"
        trap - EXIT
    fi
    podman build --network=host --layers -t "$PYTHON_IMAGE" -f images/python/Containerfile images/python
fi
seconds[base]=$(($(date +%s) - s))

step "CUDA wheelhouse $WHEELS"
s=$(date +%s)
if [[ -f $WHEELS/.done ]] && [[ -z $(find requirements/train.txt requirements/build.txt requirements/constraints.txt \
    -newer "$WHEELS/.done") ]]; then
    echo "$WHEELS is up to date"
else
    rm -rf "$WHEELS"; mkdir -p "$WHEELS"
    platforms=()
    for n in $(seq 36 -1 17); do platforms+=(--platform "manylinux_2_${n}_x86_64"); done  # bookworm: glibc 2.36
    # PIP_CONFIG_FILE=/dev/null and no PIP_FIND_LINKS: PyPI only, not this machine's local CPU torch.
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null \
        "$PYTHON" -m pip download --quiet --disable-pip-version-check -d "$WHEELS" --only-binary=:all: \
        --implementation cp --python-version 3.11 --abi cp311 "${platforms[@]}" --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --platform linux_x86_64 \
        -r requirements/train.txt -r requirements/build.txt -c requirements/constraints.txt
    touch "$WHEELS/.done"
fi
du -sh "$WHEELS"
seconds[wheels]=$(($(date +%s) - s))

step "build $IMAGE (Dockerfile.train, CUDA torch)"
s=$(date +%s)
podman build --network=host --layers -t "$IMAGE" --build-arg BASE_IMAGE="$PYTHON_IMAGE" \
    --build-arg VERSION="$VERSION" --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels-cuda \
    -v "$PWD/$WHEELS:/wheels-cuda:ro" -f Dockerfile.train .
seconds[build]=$(($(date +%s) - s))

step "inspect inside $IMAGE (its user, read-only root, no network, no GPU)"
s=$(date +%s)
status=0
podman run --rm --read-only --tmpfs /tmp --network=none --entrypoint python \
    -v "$PWD/images/cuda/probe.py:/check/probe.py:ro" "$IMAGE" /check/probe.py >"$WORK/probe.json" || status=$?
cat "$WORK/probe.json"
seconds[inspect]=$(($(date +%s) - s))

step "compressed size"
s=$(date +%s)
"$PYTHON" -m benchmarks.images_cuda --image "$IMAGE" --base "$PYTHON_IMAGE" --inspect "$WORK/probe.json" \
    --work-dir "$WORK" --out "$RESULT" --seconds "base=${seconds[base]}" "wheels=${seconds[wheels]}" \
    "build=${seconds[build]}" "inspect=${seconds[inspect]}" || status=1
step "done (exit $status)"
exit "$status"
