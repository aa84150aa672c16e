"""The one dataset registry: `load(name, data_dir, **options)` dispatches to the loader registered under `name`.

`dataset_scripts.prepare`, `train.py`, `evaluate_model.py` and `bench/` all load data through `load`, so every source
is reached the same way and takes its options under the same names (a config field, a CLI flag and a loader keyword
are one name):

- `seed_split`: split seed, also the subset seed of `train_fraction`; synthetic, isic2019, derm7pt.
- `split_fractions`: (train, validation, test) group shares of a seeded split; synthetic, isic2019.
- `train_fraction`: group-level share of the training split to keep; synthetic, isic2019, derm7pt.
- `skip_bad_images`: count and skip missing / unreadable images instead of raising `DataError`; isic2019, derm7pt,
  isic2024.
- `verify_images`: open every image header with PIL; all.
- `skip_bad_images` and `verify_images` also apply to isic2018_task2 (grounding masks, a `test` split only).
- `cache_dir`: where an Arrow file written by the loader goes; isic2024.
- `synthetic_seed`, `synthetic_num_images`, `synthetic_image_size`, `synthetic_shift`: generation parameters;
  `synthetic_test_per_class`, `synthetic_validation_per_class`: class-balanced held-out splits; synthetic.
- `derm7pt_image_type`: `"derm"` (dermoscopic) or `"clinic"`; derm7pt.
- `isic2024_metadata_file`, `isic2024_image_file`: the metadata CSV and the HDF5 of JPEG bytes; isic2024.
- `label_map`, `class_labels`: a JSON map of raw labels to classes, and the run's class list; csv, ham10000,
  pad_ufes_20 (`own_data`). `split_fractions`, `train_fraction`, `skip_bad_images` apply to them as well.
- `csv`, `image_dir`, `image_column`, `label_column`, `group_column`, `patient_column`, `age_column`, `sex_column`,
  `site_column`: the generic CSV loader's file, image folder and column names; csv.

An option given as `None` counts as not given (the source's default applies). Options named with another registered
source's prefix (`synthetic_...` while loading `isic2019`) belong to that source and are ignored, so one flat set of
options (a `DataArguments`, an argparse namespace) can be passed whatever the source. Any other option the source's
loader does not take is an error naming the source and the options it takes.

A new source registers a loader with the uniform signature `loader(data_dir, *, <options>) -> DatasetDict` (the
`DatasetDict` carrying a `.summary` `LoadSummary`, as `dataset_scripts.build_dataset_dict` gives) and a docstring:

    register_dataset("my_source", load_my_source, splits=("train", "validation", "test"))
"""

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import DatasetDict

from ._common import LoadSummary
from .own_data import load_ham10000, load_pad_ufes_20

ALL_SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class DatasetSource:
    """A registered data source.

    Args:
        name (`str`): the registry key (`--dataset_name` / `--dataset`).
        loader (`Callable`): `loader(data_dir, *, <options>) -> DatasetDict` with a `.summary` attribute.
        splits (`tuple[str, ...]`): the splits it returns (`("test",)` for an evaluation-only source).
        requires_data_dir (`bool`): False when the loader can produce the data itself (the synthetic generator).
    """

    name: str
    loader: Callable[..., DatasetDict]
    splits: tuple[str, ...] = ALL_SPLITS
    requires_data_dir: bool = True

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options the loader takes."""
        params = inspect.signature(self.loader).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @property
    def description(self) -> str:
        """The first line of the loader's docstring."""
        return (inspect.getdoc(self.loader) or "").split("\n")[0]


_REGISTRY: dict[str, DatasetSource] = {}


def register_dataset(
    name: str,
    loader: Callable[..., DatasetDict],
    splits: Sequence[str] = ALL_SPLITS,
    requires_data_dir: bool = True,
) -> DatasetSource:
    """Register `loader` under `name` (see the module docstring for the loader signature). Returns the entry.

    Raises `ValueError` when `name` is taken, when a split is not one of `train`, `validation`, `test`, or when the
    loader has no docstring or takes a positional argument other than `data_dir`.
    """
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} is already registered ({_REGISTRY[name].loader.__qualname__})")
    unknown = [s for s in splits if s not in ALL_SPLITS]
    if unknown or not splits:
        raise ValueError(f"dataset {name!r}: splits must be a non-empty subset of {ALL_SPLITS}, got {list(splits)}")
    if not inspect.getdoc(loader):
        raise ValueError(f"dataset {name!r}: the loader {loader.__qualname__} needs a docstring")
    positional = [
        p.name for p in inspect.signature(loader).parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if positional != ["data_dir"]:
        raise ValueError(
            f"dataset {name!r}: the loader must take `data_dir` then keyword-only options, not {positional}"
        )
    entry = DatasetSource(name, loader, tuple(splits), requires_data_dir)
    _REGISTRY[name] = entry
    return entry


def unregister_dataset(name: str) -> DatasetSource:
    """Remove `name` from the registry (e.g. a source a test registered); returns its entry."""
    return _REGISTRY.pop(get_dataset_source(name).name)


def dataset_names() -> list[str]:
    """The registered source names, in registration order."""
    return list(_REGISTRY)


def get_dataset_source(name: str) -> DatasetSource:
    """The registry entry of `name`; `ValueError` listing the registered names when there is none."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def load(name: str, data_dir: str | Path | None = None, **options) -> tuple[DatasetDict, LoadSummary]:
    """Load the registered source `name` into the shared schema.

    Args:
        name (`str`): a registered source (`dataset_names()`).
        data_dir (`str` or `Path`, *optional*): the raw files (for `synthetic`: where they are generated when missing).
        **options: the source's options (module docstring); `None` means not given; options prefixed with another
            registered source's name are ignored.

    Returns:
        `(DatasetDict, LoadSummary)`: the splits of `get_dataset_source(name).splits` (the `DatasetDict` also keeps
        the summary as `.summary`), and what was read, excluded and skipped.
    """
    source = get_dataset_source(name)
    if data_dir is None and source.requires_data_dir:
        raise ValueError(f"dataset {name!r} needs a data_dir (the folder of the raw download)")
    taken = set(source.options)
    others = tuple(f"{other}_" for other in _REGISTRY if other != name)
    given = {}
    for key, value in options.items():
        if value is None or (key not in taken and key.startswith(others)):
            continue
        if key not in taken:
            raise ValueError(f"dataset {name!r} does not take the option {key!r}; it takes {sorted(taken)}")
        given[key] = value
    data = source.loader(data_dir, **given)
    return data, data.summary


# ---------------------------------------------------------------------------------------------------------------------
# the built-in sources: thin loaders with the registry's option names, calling the source modules
# ---------------------------------------------------------------------------------------------------------------------


def load_synthetic(
    data_dir: str | Path | None,
    *,
    seed_split: int | None = None,
    synthetic_seed: int | None = None,
    synthetic_num_images: int | None = None,
    synthetic_image_size: int | None = None,
    synthetic_test_per_class: int | None = None,
    synthetic_validation_per_class: int | None = None,
    synthetic_shift: bool = False,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    train_fraction: float = 1.0,
    verify_images: bool = False,
) -> DatasetDict:
    """Procedural synthetic dermoscopy (never clinical data), generated in `data_dir` when missing, split as ISIC 2019.

    `synthetic_seed` (generation seed), `synthetic_num_images`, `synthetic_image_size` and the held-out sizes
    `synthetic_test_per_class` / `synthetic_validation_per_class` left unset take the values of the generation already
    in `data_dir` (its `generation.json`), else 0, 1000, 224 and none (a fractional split). Given values must match
    that generation. `seed_split` seeds the split only (default: the generation seed, as before). `synthetic_shift` draws the acquisition-shifted
    out-of-distribution set (`synthetic.SHIFT`).
    """
    from . import synthetic

    found = synthetic.read_generation(data_dir) if data_dir is not None else {}
    return synthetic.load(
        data_dir,
        num_images=synthetic_num_images if synthetic_num_images is not None else found.get("num_images", 1000),
        seed=synthetic_seed if synthetic_seed is not None else found.get("seed", 0),
        image_size=synthetic_image_size if synthetic_image_size is not None else found.get("image_size", 224),
        split_seed=seed_split if seed_split is not None else found.get("seed", 0),
        test_per_class=synthetic_test_per_class,
        validation_per_class=synthetic_validation_per_class,
        shift=synthetic_shift or bool(found.get("shift")),
        split_fractions=split_fractions,
        train_fraction=train_fraction,
        verify_images=verify_images,
    )


def load_isic2019(
    data_dir: str | Path,
    *,
    seed_split: int = 0,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    train_fraction: float = 1.0,
    skip_bad_images: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """ISIC 2019 training release, lesion-level stratified train / validation / test split (`isic2019.load`)."""
    from . import isic2019

    return isic2019.load(
        data_dir,
        split_fractions=split_fractions,
        seed=seed_split,
        train_fraction=train_fraction,
        skip_bad_images=skip_bad_images,
        verify_images=verify_images,
    )


def load_derm7pt(
    data_dir: str | Path,
    *,
    seed_split: int = 0,
    train_fraction: float = 1.0,
    derm7pt_image_type: str = "derm",
    skip_bad_images: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """Derm7pt release_v0 on its official train / validation / test index files (`derm7pt.load`)."""
    from . import derm7pt

    return derm7pt.load(
        data_dir,
        image_type=derm7pt_image_type,
        seed=seed_split,
        train_fraction=train_fraction,
        skip_bad_images=skip_bad_images,
        verify_images=verify_images,
    )


def load_isic2024(
    data_dir: str | Path,
    *,
    isic2024_metadata_file: str = "train-metadata.csv",
    isic2024_image_file: str = "train-image.hdf5",
    skip_bad_images: bool = False,
    verify_images: bool = True,
    cache_dir: str | None = None,
) -> DatasetDict:
    """ISIC 2024 (SLICE-3D) as one out-of-distribution `test` split, images read lazily from the HDF5 file."""
    from . import isic2024

    return isic2024.load(
        data_dir,
        metadata_file=isic2024_metadata_file,
        image_file=isic2024_image_file,
        skip_bad_images=skip_bad_images,
        verify_images=verify_images,
        cache_dir=cache_dir,
    )


def load_csv(
    data_dir: str | Path | None,
    *,
    csv: str | None = None,
    image_dir: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    group_column: str | None = None,
    patient_column: str | None = None,
    age_column: str | None = None,
    sex_column: str | None = None,
    site_column: str | None = None,
    label_map: str | None = None,
    class_labels: Sequence[str] | None = None,
    seed_split: int = 0,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    train_fraction: float = 1.0,
    skip_bad_images: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """Your own CSV + image folder, patient-level splits with a patient column, else lesion-level (`own_data`).

    `csv` and `image_dir` relative paths are taken from `data_dir` when it is given; `image_dir` defaults to
    `data_dir`, else the CSV's folder. `csv`, `image_column` and `label_column` are required.
    """
    from . import own_data

    missing = [name for name, value in (("csv", csv), ("image_column", image_column), ("label_column", label_column))
               if not value]
    if missing:
        raise ValueError(f"dataset 'csv' needs the option(s) {missing} (--csv FILE --image_column C --label_column C)")
    base = Path(data_dir) if data_dir is not None else None
    csv_path = base / csv if base is not None and not Path(csv).is_absolute() else Path(csv)
    if image_dir is None:
        images = base if base is not None else csv_path.parent
    else:
        images = base / image_dir if base is not None and not Path(image_dir).is_absolute() else Path(image_dir)
    return own_data.load_table(
        csv_path, images, image_column=image_column, label_column=label_column, group_column=group_column,
        patient_column=patient_column, age_column=age_column, sex_column=sex_column, site_column=site_column,
        label_map=label_map, class_labels=class_labels, split_fractions=split_fractions, seed=seed_split,
        train_fraction=train_fraction, skip_bad_images=skip_bad_images, verify_images=verify_images,
    )


register_dataset("synthetic", load_synthetic, requires_data_dir=False)
register_dataset("isic2019", load_isic2019)
register_dataset("derm7pt", load_derm7pt)
register_dataset("isic2024", load_isic2024, splits=("test",))
register_dataset("csv", load_csv, requires_data_dir=False)
register_dataset("ham10000", load_ham10000)
register_dataset("pad_ufes_20", load_pad_ufes_20)


def load_isic2018_task2(
    data_dir: str | Path,
    *,
    skip_bad_images: bool = False,
    verify_images: bool = True,
) -> DatasetDict:
    """ISIC 2018 Task 2 images with their five attribute masks as a `test` split, for grounding (no class labels)."""
    from . import isic2018_task2

    return isic2018_task2.load(data_dir, skip_bad_images=skip_bad_images, verify_images=verify_images)


register_dataset("isic2018_task2", load_isic2018_task2, splits=("test",))


__all__ = [
    "DatasetSource",
    "dataset_names",
    "get_dataset_source",
    "load",
    "load_csv",
    "load_derm7pt",
    "load_ham10000",
    "load_isic2019",
    "load_isic2018_task2",
    "load_isic2024",
    "load_pad_ufes_20",
    "load_synthetic",
    "register_dataset",
    "unregister_dataset",
]
