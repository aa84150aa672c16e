# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Peak memory and throughput of `python -m dataset_scripts.prepare` at two sizes, side by side.

    python -m bench.prepare_scale --sizes 2000 20000 --num_proc 1

A pool of synthetic images is generated once (`dataset_scripts.synthetic.generate`, 200 images); for each size an
ISIC 2019 download layout of that many image files is written (copies of the pool's JPEGs under new ids, two images
per lesion, the pool's labels and metadata), so that generation time does not scale the benchmark. Then `prepare` runs
in a fresh process on it (`--dataset isic2019`: reading the CSVs, locating every file, decode-verification, writing
Arrow with the image bytes embedded). Reported per size: peak RSS of the prepare process (`ru_maxrss`; with
`--num_proc` > 1 the workers are separate processes, not included), wall time, images per second, and the RSS ratio
largest / smallest (issue 9 asks for < 1.3: memory must not grow with the number of images).
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


def make_pool(root: Path, image_size: int) -> Path:
    from dataset_scripts import synthetic

    pool = root / "pool"
    synthetic.generate(pool, num_images=200, seed=0, image_size=image_size, write_derm7pt=False)
    return pool


def make_download(pool: Path, size: int, target: Path) -> Path:
    """An ISIC 2019 layout of `size` images copied from the synthetic `pool` (labels and metadata cycled)."""
    import csv

    source = next(p for p in pool.rglob("ISIC_2019_Training_GroundTruth.csv")).parent
    with open(source / "ISIC_2019_Training_GroundTruth.csv", newline="") as handle:
        gt = list(csv.reader(handle))
    with open(source / "ISIC_2019_Training_Metadata.csv", newline="") as handle:
        meta = list(csv.reader(handle))
    images = target / "ISIC_2019_Training_Input"
    images.mkdir(parents=True)
    gt_rows, meta_rows = [gt[0]], [meta[0]]
    for i in range(size):
        k = 1 + i % (len(gt) - 1)
        image_id = f"ISIC_{i:07d}"
        shutil.copyfile(source / "ISIC_2019_Training_Input" / f"{gt[k][0]}.jpg", images / f"{image_id}.jpg")
        gt_rows.append([image_id, *gt[k][1:]])
        age, site, _, sex = meta[k][1:5]
        meta_rows.append([image_id, age, site, f"L{i // 2:07d}", sex])
    for name, rows in (("ISIC_2019_Training_GroundTruth.csv", gt_rows), ("ISIC_2019_Training_Metadata.csv", meta_rows)):
        with open(target / name, "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    return target


def run(size: int, pool: Path, num_proc: int, root: Path, fmt: str) -> dict:
    raw = make_download(pool, size, root / f"raw{size}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = root / f"out{size}"
    cmd = [sys.executable, "-c", CHILD, "--dataset", "isic2019", "--data_dir", str(raw), "--output_dir", str(out),
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
    parser.add_argument("--image_size", type=int, default=224, help="side of the pool images")
    parser.add_argument("--num_proc", type=int, default=1)
    parser.add_argument("--format", default="arrow", choices=("arrow", "parquet"))
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="prepare-scale-"))
    rows = []
    try:
        pool = make_pool(root, args.image_size)
        for size in args.sizes:
            started = time.time()
            rows.append(run(size, pool, args.num_proc, root, args.format))
            print(f"{size} images done in {time.time() - started:.0f} s (incl. copying the files)", file=sys.stderr)
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
