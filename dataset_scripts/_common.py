"""Helpers shared by the loaders: CSV reading with row numbers, image checks, the load summary, Dataset building."""

import csv
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict

from .schema import FEATURES, class_names_of


class DataError(ValueError):
    """Bad raw input: the message names the file and, where there is one, the row (1-based line number)."""


def where(path, line: int | None = None) -> str:
    return f"{path}" if line is None else f"{path}, line {line}"


def read_csv(path, required_columns: Iterable[str]) -> tuple[list[str], list[tuple[int, dict]]]:
    """Read a CSV (any line endings, optional BOM) into `(header, [(line_number, row_dict), ...])`.

    Raises `DataError` naming the file when it is missing, when a required column is absent, or when a row has more or
    fewer fields than the header.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return _read_csv(path, required_columns)
    except UnicodeDecodeError as err:
        raise DataError(f"{where(path, _bad_utf8_line(path))}: not UTF-8 ({err.reason} at byte {err.object[err.start:err.start + 1]!r}); "
                        "save the file as UTF-8") from None


def _bad_utf8_line(path) -> int | None:
    """The 1-based line number of the first line of `path` that is not valid UTF-8."""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def _read_csv(path, required_columns):
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: empty file (no header)") from None
        missing = [c for c in required_columns if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {header}")
        rows = []
        for values in reader:
            line = reader.line_num
            if not values or all(not v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise DataError(f"{where(path, line)}: {len(values)} fields, header has {len(header)}")
            rows.append((line, dict(zip(header, values))))
    return header, rows


_LISTING_CACHE: dict = {}


def find_file(directory: Path, relative: str) -> tuple[Path | None, bool]:
    """Locate `directory / relative`; when the exact name is absent, match the file name case-insensitively.

    Returns `(path or None, matched_by_case_folding)`. Directory listings are cached per directory path + mtime.
    """
    exact = directory / relative
    if exact.is_file():
        return exact, False
    parent = exact.parent
    if not parent.is_dir():
        return None, False
    key = (str(parent), parent.stat().st_mtime_ns)
    index = _LISTING_CACHE.get(key)
    if index is None:
        index = {}
        for name in os.listdir(parent):
            index.setdefault(name.lower(), name)
        _LISTING_CACHE[key] = index
    name = index.get(exact.name.lower())
    if name is None:
        return None, False
    return parent / name, True


def decode_check(image) -> str | None:
    """None when the image decodes through the one image loader (`processing_skinclip_vl.load_image`, really decoding:
    `Image.verify()` does not), else the reason it does not.

    `image` is a path, raw bytes or a `datasets` image dict. JPEGs are decoded in draft mode (at 1/8 scale: every
    compressed byte is still read, so truncation is caught, at a fraction of the cost). Images over PIL's
    decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) are bad images.
    """
    import warnings

    from PIL import Image

    from processing_skinclip_vl import load_image

    if isinstance(image, Path):
        image = str(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            load_image(image, draft=True)
    except Image.DecompressionBombWarning as err:
        return f"decompression bomb: {err}"
    except (ValueError, OSError, SyntaxError, EOFError) as err:
        text = str(err)
        if "decompression bomb" in text.lower():
            return f"decompression bomb: {text}"
        cause = err.__cause__
        return f"{type(cause).__name__}: {cause}" if cause is not None else f"{type(err).__name__}: {text}"
    return None


def check_image(path: Path) -> str | None:
    """None when PIL can decode the file, else the reason it cannot (`decode_check`)."""
    return decode_check(path)


def check_image_bytes(data: bytes) -> str | None:
    """None when PIL can decode the bytes, else the reason it cannot (`decode_check`)."""
    return decode_check(bytes(data))


def inside(directory, relative: str, context: str) -> str:
    """`relative` unchanged when it names a file inside `directory`; a `DataError` naming `context` when it is an
    absolute path or climbs out with `..` (an image id is a name, never a way out of the image folder)."""
    from pathlib import PurePosixPath, PureWindowsPath

    for pure in (PurePosixPath(relative), PureWindowsPath(relative)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            raise DataError(f"{context}: image {relative!r} is outside the image folder {directory} "
                            "(absolute paths and '..' are not allowed)")
    return relative


def note_metadata(summary: "LoadSummary", raw_meta: dict, image_id: str) -> None:
    """Count, per field, the metadata values of a row that are given but not understood (used as unknown)."""
    from processing_skinclip_vl import metadata_rejections

    for field_name in metadata_rejections(raw_meta):
        summary.note(f"metadata value not understood (used as unknown): {field_name}", image_id)


def locate_image(directory, relative, *, verify: bool, skip_bad_images: bool, summary: "LoadSummary", image_id: str,
                 context: str) -> Path | None:
    """Find `relative` under `directory` (case-insensitively) and check that it opens.

    A missing or unreadable file raises `DataError` naming `context` (the CSV file and line), or, with
    `skip_bad_images`, is counted as a skip in `summary` and gives `None`. A case-folded match is noted."""
    if relative:
        inside(directory, relative, context)
    path, folded = find_file(Path(directory), relative) if relative else (None, False)
    problem = None
    if path is None:
        problem = ("image file missing", f"{Path(directory) / (relative or '')} not found")
    elif verify:
        reason = check_image(path)
        if reason is not None:
            problem = ("image file unreadable", f"{path}: {reason}")
    if problem is not None:
        if not skip_bad_images:
            raise DataError(f"{context}: {problem[1]}")
        summary.skip(problem[0], image_id)
        return None
    if folded:
        summary.note("image found by case-insensitive name match", image_id)
    return path


@dataclass
class LoadSummary:
    """What a loader read: rows per split and class, and every exclusion / skip with its count, reason and examples.

    Exclusions are rows dropped by rule (no class in the label space); skips are rows dropped because of bad input,
    only when a `skip_*` flag allowed it. Notes are counted facts that drop nothing (e.g. case-folded file names).
    """

    dataset: str
    data_dir: str
    rows: dict = field(default_factory=dict)
    exclusions: dict = field(default_factory=lambda: defaultdict(list))
    skips: dict = field(default_factory=lambda: defaultdict(list))
    notes: dict = field(default_factory=lambda: defaultdict(list))
    settings: dict = field(default_factory=dict)

    def exclude(self, reason: str, item: str) -> None:
        self.exclusions[reason].append(item)

    def skip(self, reason: str, item: str) -> None:
        self.skips[reason].append(item)

    def note(self, reason: str, item: str) -> None:
        self.notes[reason].append(item)

    def count_rows(self, dataset_dict: DatasetDict) -> None:
        self.rows = {}
        for split, ds in dataset_dict.items():
            counts = Counter(ds["label"])
            per_class = {name: counts.get(i, 0) for i, name in enumerate(class_names_of(ds))}
            if counts.get(-1):
                per_class["no fine class"] = counts[-1]
            self.rows[split] = {"total": len(ds), "per_class": per_class}
        groups = {split: len(set(ds["group_id"])) for split, ds in dataset_dict.items()}
        self.settings["groups_per_split"] = groups

    @staticmethod
    def _counted(d: dict) -> list:
        return [
            {"reason": reason, "count": len(items), "examples": items[:5]}
            for reason, items in sorted(d.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        ]

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "data_dir": self.data_dir,
            "rows": self.rows,
            "exclusions": self._counted(self.exclusions),
            "skips": self._counted(self.skips),
            "notes": self._counted(self.notes),
            "settings": self.settings,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def format(self) -> str:
        lines = [f"dataset: {self.dataset} (from {self.data_dir})"]
        for split, info in self.rows.items():
            per = ", ".join(f"{k} {v}" for k, v in info["per_class"].items())
            lines.append(f"  {split}: {info['total']} rows ({per})")
        for title, d in (("excluded", self.exclusions), ("skipped", self.skips), ("note", self.notes)):
            if not d:
                lines.append(f"  {title}: none")
            for item in self._counted(d):
                lines.append(f"  {title}: {item['count']} x {item['reason']} (e.g. {', '.join(item['examples'])})")
        return "\n".join(lines)


def rows_to_dataset(rows: list, features=None) -> Dataset:
    """Rows (dicts with every schema column) -> `Dataset` with `features` (default `FEATURES`), images as lazy paths."""
    features = FEATURES if features is None else features
    columns = {name: [r[name] for r in rows] for name in features}
    return Dataset.from_dict(columns, features=features)


def empty_row_fields() -> dict:
    """Defaults for the columns a source does not fill."""
    return {"criteria": [], "patient_id": None, "derm7pt_group": -1, "seven_point": None}


def build_dataset_dict(rows_by_split: dict, summary: LoadSummary, train_fraction: float = 1.0, seed: int = 0,
                       features=None):
    """Per-split rows -> `DatasetDict`, with the optional group-level training subset, the leakage check and counts.

    `features` is the schema (`schema.build_features(class_names)` for a run's own class list; default `FEATURES`)."""
    from .splits import check_no_group_leakage, group_subset

    if train_fraction != 1.0 and "train" in rows_by_split:
        train = rows_by_split["train"]
        keep = group_subset([r["label"] for r in train], [r["group_id"] for r in train], train_fraction, seed)
        dropped = len(train) - len(keep)
        kept_rows = [train[i] for i in keep]
        kept_ids = {r["image_id"] for r in kept_rows}
        for r in train:
            if r["image_id"] not in kept_ids:
                summary.note(f"left out of train by train_fraction={train_fraction} (group-level)", r["image_id"])
        rows_by_split = {**rows_by_split, "train": kept_rows}
        summary.settings["train_fraction_dropped_rows"] = dropped
    check_no_group_leakage({split: [r["group_id"] for r in rows] for split, rows in rows_by_split.items()})
    dd = DatasetDict({split: rows_to_dataset(rows, features) for split, rows in rows_by_split.items()})
    summary.count_rows(dd)
    dd.summary = summary
    return dd


def align_class_labels(data, class_names, what: str = "the model"):
    """Re-express a `Dataset` / `DatasetDict`'s `label` over `class_names` (a model's `config.class_labels`), by name.

    Raises `DataError` naming the labels the data have (rows with them) that `class_names` lacks, e.g. a PAD-UFES-20
    set with ACK rows given to an ISIC 2019 model (map it with `--label_map` first). The data are returned unchanged
    when their class list already is `class_names`; rows without a class (-1) stay -1."""
    from datasets import ClassLabel

    names = class_names_of(data)
    class_names = list(class_names)
    if names == class_names:
        return data
    splits = data.values() if hasattr(data, "values") and not hasattr(data, "features") else [data]
    present = Counter()
    for ds in splits:
        present.update(int(v) for v in ds["label"] if int(v) >= 0)
    lacking = {names[i]: n for i, n in sorted(present.items()) if names[i] not in class_names}
    if lacking:
        shown = ", ".join(f"{name} ({n} rows)" for name, n in lacking.items())
        raise DataError(
            f"the data have labels {what} does not have: {shown}; {what} has {class_names}. Map them into its classes "
            "with --label_map, or train a model on the data's own class list."
        )
    new_index = [class_names.index(n) if n in class_names else -1 for n in names]

    def remap(batch):
        return {"label": [new_index[v] if v >= 0 else -1 for v in batch["label"]]}

    features = (next(iter(splits))).features.copy()
    features["label"] = ClassLabel(names=class_names)
    return data.map(remap, batched=True, features=features, desc="class list of " + what)
