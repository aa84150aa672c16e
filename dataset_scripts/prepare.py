"""Turn a raw download (or the synthetic generator) into a saved HF dataset with a summary.

    python -m dataset_scripts.prepare --dataset {synthetic,isic2019,derm7pt,isic2024} --data_dir DIR \
        --output_dir OUT [--format arrow|parquet] [--push_to_hub REPO] [loader options, e.g. --seed_split 0]

Every registered source (`dataset_scripts.registry`) is loaded through `dataset_scripts.load`; the loader options
have the registry's names (`--seed_split`, `--train_fraction`, `--split_fractions`, `--skip_bad_images`,
`--derm7pt_image_type`, `--isic2024_metadata_file`, `--isic2024_image_file`, `--synthetic_num_images`,
`--synthetic_image_size`), and one a source does not take is an error.

Prints rows per split and class and every exclusion / skip with its count and reason, and writes the same as
`OUT/summary.json` beside the data. Output is atomic: everything is written to a temporary sibling folder that is
renamed to OUT at the end, so a failed run leaves no half-written OUT. Images are embedded (bytes, not paths), so OUT
does not depend on DIR.

Layouts: `arrow` -> `DatasetDict.save_to_disk(OUT)` (load with `datasets.load_from_disk`); `parquet` ->
`OUT/data/<split>-00000-of-00001.parquet` (load with `datasets.load_dataset("parquet", data_dir=OUT + "/data")`).
For `synthetic`, `--data_dir` is where the raw files are generated when missing (default `OUT/raw`, inside OUT).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from datasets import DatasetDict
from datasets.table import embed_table_storage


def build_parser() -> argparse.ArgumentParser:
    from .registry import dataset_names

    p = argparse.ArgumentParser(prog="python -m dataset_scripts.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, choices=dataset_names())
    p.add_argument("--data_dir", default=None, help="raw files (for synthetic: generated there when missing)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--format", default="arrow", choices=("arrow", "parquet"))
    p.add_argument("--push_to_hub", default=None, metavar="REPO", help="also push the DatasetDict to this Hub repo")
    # the loader options (dataset_scripts.registry): unset ones take the source's default
    p.add_argument("--seed_split", type=int, default=None,
                   help="split seed (synthetic: only the split; the generation seed is the folder's, else 0)")
    p.add_argument("--split_fractions", type=float, nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"),
                   help="group shares of a seeded split (default 0.8 0.1 0.1; not for derm7pt's official split)")
    p.add_argument("--train_fraction", type=float, default=None, help="group-level share of the training split to keep")
    p.add_argument("--skip_bad_images", action="store_true", default=None,
                   help="count and skip missing / unreadable images")
    p.add_argument("--derm7pt_image_type", default=None, choices=("derm", "clinic"), help="Derm7pt image column")
    p.add_argument("--isic2024_metadata_file", default=None, help="ISIC 2024 metadata CSV (train-metadata.csv)")
    p.add_argument("--isic2024_image_file", default=None, help="ISIC 2024 HDF5 (train-image.hdf5)")
    p.add_argument("--synthetic_num_images", type=int, default=None, help="synthetic: images to generate (1000)")
    p.add_argument("--synthetic_image_size", type=int, default=None, help="synthetic: image side (224)")
    return p


def load_dataset_dict(args, work_dir: Path) -> DatasetDict:
    """The registry's `load` with the command line's options (the synthetic raw files default to `work_dir/raw`)."""
    from .registry import get_dataset_source, load

    source = get_dataset_source(args.dataset)
    data_dir = args.data_dir
    if data_dir is None and not source.requires_data_dir:
        data_dir = str(work_dir / "raw")
    if data_dir is None:
        raise SystemExit(f"--data_dir is required for --dataset {args.dataset}")
    options = {
        "seed_split": args.seed_split,
        "split_fractions": None if args.split_fractions is None else tuple(args.split_fractions),
        "train_fraction": args.train_fraction,
        "skip_bad_images": args.skip_bad_images,
        "derm7pt_image_type": args.derm7pt_image_type,
        "isic2024_metadata_file": args.isic2024_metadata_file,
        "isic2024_image_file": args.isic2024_image_file,
        "synthetic_num_images": args.synthetic_num_images,
        "synthetic_image_size": args.synthetic_image_size,
    }
    if "cache_dir" in source.options:
        options["cache_dir"] = str(work_dir / ".cache")
    data, _ = load(args.dataset, data_dir, **options)
    return data


def embed_images(dd: DatasetDict) -> DatasetDict:
    """Replace image paths by their bytes (what `push_to_hub` does before writing Parquet)."""
    out = {}
    for split, ds in dd.items():
        fmt = ds.format
        ds = ds.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True)
        out[split] = ds.with_format(**fmt)
    return DatasetDict(out)


def write(dd: DatasetDict, out: Path, fmt: str) -> None:
    if fmt == "arrow":
        dd.save_to_disk(str(out))
    else:
        data = out / "data"
        data.mkdir(parents=True, exist_ok=True)
        for split, ds in embed_images(dd).items():
            ds.to_parquet(str(data / f"{split}-00000-of-00001.parquet"))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        dd = load_dataset_dict(args, tmp)
        summary = dd.summary
        summary.settings.update({"format": args.format, "output_dir": str(out)})
        if args.dataset == "synthetic" and not args.data_dir:  # raw files move with the final rename
            summary.data_dir = str(out / "raw" / "isic2019")
        write(dd, tmp, args.format)
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        (tmp / "summary.json").write_text(summary.to_json())
        if args.push_to_hub:
            dd.push_to_hub(args.push_to_hub)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(summary.format())
    print(f"wrote {args.format} dataset and summary.json to {out}")
    print(json.dumps({split: info["total"] for split, info in summary.rows.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
