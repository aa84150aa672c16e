"""Turn a raw download (or the synthetic generator) into a saved HF dataset with a summary.

    python -m dataset_scripts.prepare --dataset {synthetic,isic2019,derm7pt,isic2024,ham10000,pad_ufes_20} \
        --data_dir DIR --output_dir OUT [--format arrow|parquet] [--push_to_hub REPO] [loader options]
    python -m dataset_scripts.prepare --dataset csv --csv FILE --image_dir DIR --image_column C --label_column C \
        [--group_column C] [--patient_column C] [--age_column C --sex_column C --site_column C] \
        [--label_map FILE.json] [--class_labels A B ...] --output_dir OUT

Every registered source (`dataset_scripts.registry`) is loaded through `dataset_scripts.load`; the loader options
have the registry's names (`--seed_split`, `--train_fraction`, `--split_fractions`, `--skip_bad_images`,
`--derm7pt_image_type`, `--isic2024_metadata_file`, `--isic2024_image_file`, `--synthetic_num_images`,
`--synthetic_image_size`; for your own data (`dataset_scripts.own_data`) `--csv`, `--image_dir`, the `--*_column`s,
`--label_map`, `--class_labels`), and one a source does not take is an error.

Prints rows per split and class and every exclusion / skip with its count and reason, and writes the same as
`OUT/summary.json` beside the data, with a dataset card `OUT/README.md` (source, licence, split unit, rows and class
mix per split; `--push_to_hub REPO` uploads it with the data). Output is atomic: everything is written to a temporary sibling folder that is
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

from trainer.validation import number_type


def build_parser() -> argparse.ArgumentParser:
    from .registry import dataset_names

    p = argparse.ArgumentParser(prog="python -m dataset_scripts.prepare", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, choices=dataset_names())
    p.add_argument("--data_dir", default=None, help="raw files (for synthetic: generated there when missing)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--format", default="arrow", choices=("arrow", "parquet"))
    p.add_argument("--push_to_hub", default=None, metavar="REPO", help="also push the DatasetDict to this Hub repo")
    # the loader options (dataset_scripts.registry): unset ones take the source's default
    p.add_argument("--seed_split", type=number_type(integer=True, minimum=0), default=None,
                   help="split seed (synthetic: only the split; the generation seed is the folder's, else 0)")
    p.add_argument("--split_fractions", type=number_type(minimum=0, maximum=1), nargs=3, default=None, metavar=("TRAIN", "VAL", "TEST"),
                   help="group shares of a seeded split (default 0.8 0.1 0.1; not for derm7pt's official split)")
    p.add_argument("--train_fraction", type=number_type(above=0, maximum=1), default=None, help="group-level share of the training split to keep")
    p.add_argument("--skip_bad_images", action="store_true", default=None,
                   help="count and skip missing / unreadable images")
    p.add_argument("--derm7pt_image_type", default=None, choices=("derm", "clinic"), help="Derm7pt image column")
    p.add_argument("--isic2024_metadata_file", default=None, help="ISIC 2024 metadata CSV (train-metadata.csv)")
    p.add_argument("--isic2024_image_file", default=None, help="ISIC 2024 HDF5 (train-image.hdf5)")
    p.add_argument("--synthetic_num_images", type=number_type(integer=True, minimum=1), default=None, help="synthetic: images to generate (1000)")
    p.add_argument("--synthetic_image_size", type=number_type(integer=True, minimum=8), default=None, help="synthetic: image side (224)")
    own = p.add_argument_group("own data (--dataset csv; --label_map and --class_labels also for the presets)")
    own.add_argument("--csv", default=None, help="csv: the CSV file, one row per image")
    own.add_argument("--image_dir", default=None, help="csv: the image folder (default --data_dir, else the CSV's)")
    own.add_argument("--image_column", default=None, help="csv: the column naming the image file")
    own.add_argument("--label_column", default=None, help="csv: the column with the diagnosis")
    own.add_argument("--group_column", default=None, help="csv: lesion id column (lesion-level splits)")
    own.add_argument("--patient_column", default=None, help="csv: patient id column (patient-level splits)")
    own.add_argument("--age_column", default=None, help="csv: age column")
    own.add_argument("--sex_column", default=None, help="csv: sex column")
    own.add_argument("--site_column", default=None, help="csv: anatomical site column")
    own.add_argument("--label_map", default=None, metavar="FILE.json",
                     help='JSON {"raw label": "class" or null} (dataset_scripts/label_maps/ has the presets\' maps)')
    own.add_argument("--class_labels", nargs="+", default=None, metavar="CLASS", help="the class list, in head order")
    p.add_argument("--dataset_license", default=None,
                   help="Hub licence id for the dataset card (default: the source's; 'other' for --dataset csv)")
    p.add_argument("--num_proc", type=number_type(integer=True, minimum=1), default=1,
                   help="processes that decode-verify the images (default 1)")
    return p


OWN_DATA_OPTIONS = ("csv", "image_dir", "image_column", "label_column", "group_column", "patient_column", "age_column",
                    "sex_column", "site_column", "label_map", "class_labels")


def load_dataset_dict(args, work_dir: Path) -> DatasetDict:
    """The registry's `load` with the command line's options (the synthetic raw files default to `work_dir/raw`)."""
    from .registry import get_dataset_source, load

    source = get_dataset_source(args.dataset)
    data_dir = args.data_dir
    if data_dir is None and not source.requires_data_dir and args.dataset != "csv":  # generated data
        data_dir = str(work_dir / "raw")
    if data_dir is None and source.requires_data_dir:
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
        **{name: getattr(args, name) for name in OWN_DATA_OPTIONS},
    }
    if "cache_dir" in source.options:
        options["cache_dir"] = str(work_dir / ".cache")
    if "verify_images" in source.options:
        options["verify_images"] = False  # decode-verified below, in parallel, with a progress bar
    data, _ = load(args.dataset, data_dir, **options)
    return verify_images(data, num_proc=args.num_proc, skip_bad_images=bool(args.skip_bad_images))


def _check_one(item):
    from ._common import decode_check

    return decode_check(item)


def verify_images(dd: DatasetDict, num_proc: int = 1, skip_bad_images: bool = False,
                  batch_size: int = 64) -> DatasetDict:
    """Decode every image (`decode_check`: truncated files and decompression bombs are bad images), streaming over
    the image column in batches, in `num_proc` processes. A bad image raises `DataError` naming its id and file, or,
    with `skip_bad_images`, is counted in the summary's skips and its row dropped."""
    import multiprocessing

    from datasets import Image as ImageFeature
    from tqdm.auto import tqdm

    from ._common import DataError

    summary = dd.summary
    total = sum(len(ds) for ds in dd.values())
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(num_proc) if num_proc > 1 else None
    progress = tqdm(total=total, desc="verifying images", unit="image", mininterval=1.0)
    out = {}
    try:
        for split, ds in dd.items():
            view = ds.select_columns(["image", "image_id"]).cast_column("image", ImageFeature(decode=False))
            bad = {}
            for batch in view.iter(batch_size=batch_size * max(1, num_proc)):
                items = batch["image"]
                reasons = pool.map(_check_one, items, chunksize=8) if pool else [_check_one(i) for i in items]
                for image_id, item, reason in zip(batch["image_id"], items, reasons):
                    if reason is not None:
                        where = item.get("path") or "embedded bytes"
                        if not skip_bad_images:
                            raise DataError(f"{split} split, image {image_id} ({where}): {reason}")
                        bad[image_id] = reason
                progress.update(len(items))
            for image_id in bad:
                summary.skip("image file unreadable", image_id)
            out[split] = ds.filter(lambda i, bad=bad: i not in bad, input_columns="image_id") if bad else ds
    finally:
        progress.close()
        if pool is not None:
            pool.close()
            pool.join()
    result = DatasetDict(out)
    summary.count_rows(result)
    result.summary = summary
    return result


def embed_images(dd: DatasetDict, cache_dir: Path) -> DatasetDict:
    """Replace image paths by their bytes (what `push_to_hub` does before writing Parquet), batch by batch into Arrow
    files under `cache_dir` (not in memory: peak memory does not grow with the number of images)."""
    out = {}
    cache_dir.mkdir(parents=True, exist_ok=True)
    for split, ds in dd.items():
        fmt = ds.format
        ds = ds.with_format("arrow").map(
            embed_table_storage, batched=True, batch_size=256, writer_batch_size=256,
            cache_file_name=str(cache_dir / f"{split}-embedded.arrow"), desc=f"embedding images ({split})",
        )
        out[split] = ds.with_format(**fmt)
    return DatasetDict(out)


def write(dd: DatasetDict, out: Path, fmt: str) -> None:
    if fmt == "arrow":
        dd.save_to_disk(str(out))  # streams, embedding the image files' bytes shard by shard
    else:
        data = out / "data"
        data.mkdir(parents=True, exist_ok=True)
        for split, ds in embed_images(dd, out / ".cache").items():
            ds.to_parquet(str(data / f"{split}-00000-of-00001.parquet"), batch_size=256)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty", file=sys.stderr)
        return 2
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:
        raise SystemExit(f"error: --output_dir {args.output_dir}: cannot write there ({err.strerror or err})") from None
    try:
        dd = load_dataset_dict(args, tmp)
        summary = dd.summary
        for split, info in summary.rows.items():
            if info["total"] == 0:
                print(f"warning: the {split} split is empty (training and evaluation need rows in it; "
                      "use more data or other --split_fractions)", file=sys.stderr)
                summary.note(f"the {split} split is empty", split)
        summary.settings.update({"format": args.format, "output_dir": str(out)})
        if args.dataset == "synthetic" and not args.data_dir:  # raw files move with the final rename
            summary.data_dir = str(out / "raw" / "isic2019")
        try:
            write(dd, tmp, args.format)
        except OSError as err:
            raise SystemExit(f"error: writing --output_dir {args.output_dir} failed: {err}") from None
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        (tmp / "summary.json").write_text(summary.to_json())
        from trainer.hub import build_dataset_card, push_dataset_to_hub

        repo = args.push_to_hub or f"{args.dataset}-skinclip-vl"
        (tmp / "README.md").write_text(build_dataset_card(summary, repo, license=args.dataset_license))
        if args.push_to_hub:
            push_dataset_to_hub(dd, args.push_to_hub, summary, license=args.dataset_license)
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
