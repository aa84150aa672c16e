"""ISIC 2024 (SLICE-3D) -> the shared schema, as an out-of-distribution `test` split only.

Raw layout (Kaggle download)::

    data_dir/
      train-metadata.csv      (55 columns: isic_id, target, patient_id, age_approx, sex, anatom_site_general, ...,
                               iddx_full, iddx_1..iddx_5; UTF-8)
      train-image.hdf5        (one dataset per isic_id holding the JPEG bytes)
      test-metadata.csv / test-image.hdf5   (the public test file: no target, no iddx)

The fine label comes from `iddx_3` where `schema.ISIC2024_IDDX3_MAP` maps it; other rows (plain "Benign", indeterminate
or out-of-space diagnoses) keep `label` -1 and the binary `target` in `malignant`, counted by reason in the summary.
`group_id` and `patient_id` are the source `patient_id`.

Images are read lazily: `HDF5ImageStore` opens the file on first access in each process (so it is safe to pickle into
dataloader / `num_proc` workers) and reads one key at a time; the Arrow table is written by `Dataset.from_generator`
shard by shard, never holding all bytes in memory.
"""

import os
from pathlib import Path

from datasets import Dataset, DatasetDict

from processing_skinclip_vl import serialize_metadata

from ._common import (
    DataError,
    LoadSummary,
    check_image_bytes,
    empty_row_fields,
    read_csv,
)
from .schema import (
    FEATURES,
    ISIC2024_IDDX3_MAP,
    align_text_for,
    class_index,
    metadata_struct,
    template_report,
)
from .splits import check_no_group_leakage

REQUIRED_COLUMNS = ["isic_id", "patient_id", "age_approx", "sex", "anatom_site_general"]
LABEL_COLUMNS = ["target", "iddx_full", "iddx_3"]
EXTRA_COLUMNS = [
    "lesion_id",
    "clin_size_long_diam_mm",
    "image_type",
    "tbp_tile_type",
    "tbp_lv_location",
    "tbp_lv_location_simple",
    "attribution",
    "copyright_license",
]


class HDF5ImageStore:
    """Lazy, process-safe access to `isic_id -> JPEG bytes` in an ISIC 2024 HDF5 file.

    The file is opened on first access in each process (`os.getpid()` is checked), so an instance can be pickled into
    workers; nothing is read until a key is asked for.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._file = None
        self._pid = None

    def _handle(self):
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    @property
    def is_open(self) -> bool:
        """Whether this process holds the file open (False until the first key is read, and after `close`)."""
        return self._file is not None and self._pid == os.getpid()

    def __getitem__(self, key: str) -> bytes:
        value = self._handle()[key][()]
        return bytes(value.tobytes() if hasattr(value, "tobytes") else value)

    def __contains__(self, key: str) -> bool:
        return key in self._handle()

    def keys(self) -> list:
        return list(self._handle().keys())

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self):
        return {"path": self.path, "_file": None, "_pid": None}


def read_metadata(csv_path: str | Path, summary: LoadSummary | None = None) -> tuple[list, LoadSummary]:
    """Read and check an ISIC 2024 metadata CSV (no images). Returns `(records, summary)`.

    Without a `target` column (the public test file) `malignant` is -1. Raises `DataError` naming file and line for a
    missing column, a duplicate id or a target other than 0/1.
    """
    csv_path = Path(csv_path)
    summary = summary or LoadSummary(dataset="isic2024", data_dir=str(csv_path.parent))
    header, rows = read_csv(csv_path, REQUIRED_COLUMNS)
    has_target = "target" in header
    if not has_target:
        summary.settings["note"] = f"{csv_path.name} has no target column: malignant is -1 and label -1"
    records, seen = [], {}
    for line, r in rows:
        isic_id = r["isic_id"].strip()
        if isic_id in seen:
            raise DataError(f"{csv_path}, line {line}: duplicate isic_id {isic_id!r} (first at line {seen[isic_id]})")
        seen[isic_id] = line
        target = -1
        if has_target:
            raw = r["target"].strip()
            if raw not in ("0", "1", "0.0", "1.0"):
                raise DataError(f"{csv_path}, line {line} ({isic_id}): target is {raw!r}, expected 0 or 1")
            target = int(float(raw))
        iddx3 = r.get("iddx_3", "").strip()
        code = ISIC2024_IDDX3_MAP.get(iddx3)
        if code is None:
            if not has_target:
                reason = "no diagnosis in the file (public test metadata)"
            elif not iddx3:
                reason = f"no iddx_3 (iddx_full {r.get('iddx_full', '').strip()!r}): binary target only"
            elif iddx3 in ISIC2024_IDDX3_MAP:
                reason = f"iddx_3 {iddx3!r}: no class in the 8-class space, binary target only"
            else:
                reason = f"iddx_3 {iddx3!r} not in the ISIC 2024 label map, binary target only"
            summary.note(f"label -1: {reason}", isic_id)
        records.append(
            {
                **{k: v.strip() for k, v in r.items()},
                "isic_id": isic_id,
                "line": line,
                "code": code,
                "label": class_index(code),
                "malignant": target,
            }
        )
    return records, summary


def _rows(records: list, h5_path: str, dataset_name: str):

    store = HDF5ImageStore(h5_path)
    try:
        for rec in records:
            raw_meta = {k: rec[k] for k in ("age_approx", "sex", "anatom_site_general")}
            yield {
                **empty_row_fields(),
                "image": {"bytes": store[rec["isic_id"]], "path": None},
                "label": rec["label"],
                "image_id": rec["isic_id"],
                "group_id": rec["patient_id"] or rec["isic_id"],
                "patient_id": rec["patient_id"] or None,
                "dataset": dataset_name,
                "source_label": rec.get("iddx_full", ""),
                "malignant": rec["malignant"],
                "metadata": metadata_struct(
                    rec["age_approx"], rec["sex"], rec["anatom_site_general"], {k: rec.get(k) for k in EXTRA_COLUMNS}
                ),
                "meta_text": serialize_metadata(raw_meta),
                "report": template_report(rec["code"]),
                "align_text": align_text_for(rec["code"]),
            }
    finally:
        store.close()


def _generate(chunks: list, h5_path: str, dataset_name: str, stamp: str):
    for chunk in chunks:
        yield from _rows(chunk, h5_path, dataset_name)


def load(
    data_dir: str | Path,
    metadata_file: str = "train-metadata.csv",
    image_file: str = "train-image.hdf5",
    skip_bad_images: bool = False,
    verify_images: bool = True,
    cache_dir: str | None = None,
    num_proc: int | None = None,
    dataset_name: str = "isic2024",
) -> DatasetDict:
    """Load ISIC 2024 as a single `test` split (OOD evaluation).

    Args:
        data_dir (`str` or `Path`): folder with the metadata CSV and the HDF5.
        metadata_file (`str`, *optional*, defaults to `"train-metadata.csv"`): the labelled metadata file.
        image_file (`str`, *optional*, defaults to `"train-image.hdf5"`): the HDF5 of JPEG bytes keyed by `isic_id`.
        skip_bad_images (`bool`, *optional*, defaults to `False`): count and skip ids missing from the HDF5 or with
            unreadable bytes instead of raising `DataError`.
        verify_images (`bool`, *optional*, defaults to `True`): check every image's header with PIL (one key read at
            a time).
        cache_dir (`str`, *optional*): where `Dataset.from_generator` writes its Arrow file.
        num_proc (`int`, *optional*): worker processes for the Arrow writing (each opens the HDF5 itself).
        dataset_name (`str`, *optional*, defaults to `"isic2024"`): the `dataset` column value.

    Returns:
        `DatasetDict` with only `test`, and a `.summary` attribute.
    """
    data_dir = Path(data_dir)
    csv_path, h5_path = data_dir / metadata_file, data_dir / image_file
    records, summary = read_metadata(csv_path, LoadSummary(dataset=dataset_name, data_dir=str(data_dir)))
    summary.settings.update({"split": "test only (OOD)", "metadata_file": metadata_file, "image_file": image_file})
    if not h5_path.is_file():
        raise DataError(f"{h5_path}: file not found")
    store = HDF5ImageStore(h5_path)
    kept = []
    try:
        for rec in records:
            problem = None
            if rec["isic_id"] not in store:
                problem = ("image missing from the HDF5", f"key {rec['isic_id']!r} not in {h5_path}")
            elif verify_images:
                reason = check_image_bytes(store[rec["isic_id"]])
                if reason is not None:
                    problem = ("image bytes unreadable", f"{h5_path}[{rec['isic_id']!r}]: {reason}")
            if problem is not None:
                if not skip_bad_images:
                    raise DataError(f"{csv_path}, line {rec['line']} ({rec['isic_id']}): {problem[1]}")
                summary.skip(problem[0], rec["isic_id"])
                continue
            kept.append(rec)
    finally:
        store.close()
    # a stamp of the inputs makes the generator's cache fingerprint change when the files change
    st_csv, st_h5 = csv_path.stat(), h5_path.stat()
    stamp = f"{st_csv.st_mtime_ns}-{st_csv.st_size}-{st_h5.st_mtime_ns}-{st_h5.st_size}-{skip_bad_images}"
    n_chunks = max(1, min(len(kept), 64))
    chunks = [kept[i::n_chunks] for i in range(n_chunks)] if kept else [[]]
    ds = Dataset.from_generator(
        _generate,
        features=FEATURES,
        gen_kwargs={"chunks": chunks, "h5_path": str(h5_path), "dataset_name": dataset_name, "stamp": stamp},
        cache_dir=cache_dir,
        num_proc=num_proc,
        split="test",
    )
    dd = DatasetDict({"test": ds})
    check_no_group_leakage(dd)
    summary.count_rows(dd)
    dd.summary = summary
    return dd


__all__ = ["HDF5ImageStore", "load", "read_metadata"]
