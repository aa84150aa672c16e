# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Peak memory and throughput of `python -m dataset_scripts.prepare` at two sizes, side by side.

    python -m bench.prepare_scale --sizes 2000 20000 --image_size 64 --num_proc 1

For each size, the synthetic raw files are generated first (its own process, not measured), then `prepare` runs in a
fresh process on them (`--dataset synthetic --data_dir RAW`: loading, decode-verification, writing Arrow with the
image bytes embedded). Reported per size: peak RSS of the prepare process (`ru_maxrss`), wall time, images per
second, and the RSS ratio largest / smallest (issue 9 asks for < 1.3: memory must not grow with the number of images).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from dataset_scripts import prepare
start = time.perf_counter()
rc = prepare.main(sys.argv[1:])
seconds = time.perf_counter() - start
print("BENCH " + json.dumps({"rc": rc, "seconds": seconds,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(size: int, image_size: int, num_proc: int, root: Path, fmt: str) -> dict:
    raw = root / f"raw{size}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    generate = ("from dataset_scripts import synthetic; "
                f"synthetic.generate({str(raw)!r}, num_images={size}, seed=0, image_size={image_size})")
    subprocess.run([sys.executable, "-c", generate], check=True, env=env, capture_output=True)
    out = root / f"out{size}"
    cmd = [sys.executable, "-c", CHILD, "--dataset", "synthetic", "--data_dir", str(raw), "--output_dir", str(out),
           "--num_proc", str(num_proc), "--format", fmt]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    line = next(line for line in result.stdout.splitlines() if line.startswith("BENCH "))
    stats = json.loads(line[6:])
    stats.update(images=size, images_per_second=size / stats["seconds"])
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(raw, ignore_errors=True)
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--num_proc", type=int, default=1)
    parser.add_argument("--format", default="arrow", choices=("arrow", "parquet"))
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="prepare-scale-"))
    rows = []
    try:
        for size in args.sizes:
            started = time.time()
            rows.append(run(size, args.image_size, args.num_proc, root, args.format))
            print(f"{size} images done in {time.time() - started:.0f} s (incl. generation)", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"| images | peak RSS (MiB) | prepare wall (s) | images/s |   (image {args.image_size} px, "
          f"--num_proc {args.num_proc}, --format {args.format})")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} | {r['images_per_second']:.0f} |")
    ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    print(f"peak RSS ratio {rows[-1]['images']} / {rows[0]['images']}: {ratio:.3f} (target < 1.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
