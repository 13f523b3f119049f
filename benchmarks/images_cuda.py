"""The CUDA training image's measured sizes and inspection (images/cuda/check.sh, `make image-train-check`).

    .venv-train/bin/python -m benchmarks.images_cuda --image IMAGE --base BASE --inspect INSPECT.json --out RESULT

Compressed = the gzip layer blobs `podman save --format oci-archive` writes (what a registry stores and a node
pulls), summed from the manifest, as benchmarks/images.py measures the CPU variants; unpacked = `podman image
inspect`'s size. The base here is the local stand-in of python:3.11-slim-bookworm (images/python: Debian's Python
with its headers, larger than the official slim image), so the layers Dockerfile.train adds above it are given
apart. The result (benchmarks/results/images-cuda.json) feeds docs/images.md's size table (`make docs`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks import common
from benchmarks.images import GB, local_image


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--inspect", type=Path, required=True, help="images/cuda/probe.py's report")
    p.add_argument("--work-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", nargs="*", default=[], help="STEP=SECONDS of check.sh's steps")
    args = p.parse_args(argv)
    img = local_image(args.image, args.work_dir / "layers")
    base = local_image(args.base, args.work_dir / "layers")
    if img is None or base is None:
        raise SystemExit(f"{args.image} or {args.base} is not a local image")
    added = [d for d in img["layers"] if d not in set(base["layers"])]
    comp = img["compressed_by_layer"]
    try:
        inspected = json.loads(args.inspect.read_text())
    except (OSError, ValueError) as exc:
        inspected = {"passed": False, "failures": [f"no report from inspect.py: {exc}"]}
    seconds = {k: int(v) for k, v in (s.split("=", 1) for s in args.seconds)}
    result = {
        "title": "The CUDA training image, built and inspected",
        "command": "make image-train-check",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": common.machine(),
        "image": args.image,
        "id": img["id"],
        "compressed_gb": round(img["compressed_bytes"] / GB, 3),
        "unpacked_gb": round(img["unpacked_bytes"] / GB, 3),
        "base": args.base,
        "base_compressed_gb": round(base["compressed_bytes"] / GB, 3),
        "base_unpacked_gb": round(base["unpacked_bytes"] / GB, 3),
        "added_compressed_gb": round(sum(comp[d] for d in added) / GB, 3),
        "added_unpacked_gb": round((img["unpacked_bytes"] - base["unpacked_bytes"]) / GB, 3),
        "largest_layer_compressed_gb": round(max(comp.values()) / GB, 3),
        "seconds": seconds,
        "inspect": inspected,
        "passed": bool(inspected.get("passed")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.image}: {result['compressed_gb']} GB compressed, {result['unpacked_gb']} GB unpacked "
        f"({result['added_compressed_gb']} GB compressed above {args.base}); inspection "
        f"{'passed' if result['passed'] else 'FAILED'} -> {args.out}"
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
