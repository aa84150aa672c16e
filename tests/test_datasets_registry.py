"""The dataset registry: one dispatch with one set of option names, new sources registrable, one Derm7pt table."""

import pytest

import dataset_scripts
from dataset_scripts import DataError, LoadSummary, build_dataset_dict, empty_row_fields, isic2019, synthetic
from dataset_scripts.schema import (
    CLASS_NAMES,
    DERM7PT_DIAGNOSIS_TABLE,
    DERM7PT_GROUPS,
    FEATURES,
    align_text_for,
    metadata_struct,
)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry") / "data"
    synthetic.generate(root, num_images=48, seed=1, image_size=32)
    return root


def _ids(data) -> dict:
    return {split: ds["image_id"] for split, ds in data.items()}


def test_builtin_sources_and_their_splits():
    assert dataset_scripts.dataset_names()[:4] == ["synthetic", "isic2019", "derm7pt", "isic2024"]
    assert dataset_scripts.get_dataset_source("isic2024").splits == ("test",)
    assert dataset_scripts.get_dataset_source("derm7pt").splits == ("train", "validation", "test")
    assert "derm7pt_image_type" in dataset_scripts.get_dataset_source("derm7pt").options
    with pytest.raises(ValueError, match="unknown dataset 'ham'; registered: synthetic, isic2019"):
        dataset_scripts.load("ham", "somewhere")
    with pytest.raises(ValueError, match="'isic2019' needs a data_dir"):
        dataset_scripts.load("isic2019")


def test_registry_gives_what_the_source_loader_gives(syn):
    data, summary = dataset_scripts.load(
        "synthetic", syn, seed_split=1, synthetic_num_images=48, synthetic_image_size=32
    )
    direct = synthetic.load(syn, num_images=48, seed=1, image_size=32)
    assert _ids(data) == _ids(direct) and data["train"].features == FEATURES
    assert isinstance(summary, LoadSummary) and summary is data.summary
    assert summary.to_dict()["rows"] == direct.summary.to_dict()["rows"]
    # unset synthetic options come from the generation in the folder; given ones must match it
    again, _ = dataset_scripts.load("synthetic", syn)
    assert _ids(again) == _ids(direct)
    with pytest.raises(ValueError, match="not the requested"):
        dataset_scripts.load("synthetic", syn, synthetic_num_images=49)

    isic, _ = dataset_scripts.load("isic2019", syn / "isic2019", seed_split=3, split_fractions=(0.6, 0.2, 0.2))
    assert _ids(isic) == _ids(isic2019.load(syn / "isic2019", seed=3, split_fractions=(0.6, 0.2, 0.2)))
    assert _ids(isic) != _ids(isic2019.load(syn / "isic2019", seed=4, split_fractions=(0.6, 0.2, 0.2)))


def test_options_one_name_each_and_nothing_ignored_silently(syn):
    derm = syn / "derm7pt"
    # options of other sources (by prefix) and unset ones (None) are not this source's business
    data, _ = dataset_scripts.load(
        "derm7pt", derm, synthetic_num_images=5, isic2024_image_file="x.hdf5", split_fractions=None,
        derm7pt_image_type="clinic",
    )
    assert all(r["image"].size == (24, 24) for r in data["test"])  # the generator's blurred 3/4-size clinical view
    with pytest.raises(ValueError, match="'derm7pt' does not take the option 'split_fractions'"):
        dataset_scripts.load("derm7pt", derm, split_fractions=(0.8, 0.1, 0.1))
    with pytest.raises(ValueError, match="'isic2024' does not take the option 'seed_split'"):
        dataset_scripts.load("isic2024", syn, seed_split=0)
    with pytest.raises(ValueError, match="does not take the option 'num_images'"):
        dataset_scripts.load("synthetic", syn, num_images=48)


def test_one_derm7pt_table_serves_both_label_spaces(syn):
    data, summary = dataset_scripts.load("derm7pt", syn / "derm7pt")
    rows = [r for ds in data.values() for r in ds]
    assert rows
    for r in rows:
        code, group = DERM7PT_DIAGNOSIS_TABLE[r["source_label"]]
        assert CLASS_NAMES[r["label"]] == code and DERM7PT_GROUPS[r["derm7pt_group"]] == group
    excluded = {e["reason"]: e["count"] for e in summary.to_dict()["exclusions"]}
    unmapped = {d for d, (code, _) in DERM7PT_DIAGNOSIS_TABLE.items() if code is None}
    assert set(excluded) <= {f"diagnosis {d!r}: no class in the 8-class space" for d in unmapped}
    assert {group for _, group in DERM7PT_DIAGNOSIS_TABLE.values()} == set(DERM7PT_GROUPS)


def _load_toy(data_dir, *, seed_split: int = 0, toy_rows: int = 4):
    """A toy source: `toy_rows` rows of one image, every row its own group, all in `test`."""
    summary = LoadSummary(dataset="toy", data_dir=str(data_dir))
    image = next(iter(sorted((data_dir / "ISIC_2019_Training_Input").glob("*.jpg"))))
    rows = [
        {**empty_row_fields(), "image": {"path": str(image), "bytes": None}, "label": 1, "image_id": f"toy_{i}",
         "group_id": f"toy_{i}_{seed_split}", "dataset": "toy", "source_label": "nevus", "malignant": 0,
         "metadata": metadata_struct(None, None, None), "meta_text": "", "report": "",
         "align_text": align_text_for("NV")}
        for i in range(toy_rows)
    ]
    return build_dataset_dict({"test": rows}, summary)


def test_a_new_source_registers_and_loads_through_the_one_dispatch(syn):
    def no_doc(data_dir, *, seed_split=0):
        return None

    def positional_seed(data_dir, seed):
        """Takes its seed positionally."""

    dataset_scripts.register_dataset("toy", _load_toy, splits=("test",))
    try:
        data, summary = dataset_scripts.load("toy", syn / "isic2019", toy_rows=3, synthetic_num_images=7)
        assert list(data) == ["test"] and data["test"]["image_id"] == ["toy_0", "toy_1", "toy_2"]
        assert summary.rows["test"]["per_class"]["NV"] == 3
        # another source now ignores the `toy_` options, and `toy` is refused a second registration
        dataset_scripts.load("derm7pt", syn / "derm7pt", toy_rows=3)
        with pytest.raises(ValueError, match="already registered"):
            dataset_scripts.register_dataset("toy", _load_toy)
    finally:
        dataset_scripts.unregister_dataset("toy")
    assert "toy" not in dataset_scripts.dataset_names()
    with pytest.raises(ValueError, match="needs a docstring"):
        dataset_scripts.register_dataset("bad", no_doc)
    with pytest.raises(ValueError, match="keyword-only"):
        dataset_scripts.register_dataset("bad", positional_seed)
    with pytest.raises(ValueError, match="splits"):
        dataset_scripts.register_dataset("bad", _load_toy, splits=("holdout",))
    assert "bad" not in dataset_scripts.dataset_names()


def test_bad_input_still_names_the_file(syn, tmp_path):
    import shutil

    raw = tmp_path / "isic2019"
    shutil.copytree(syn / "isic2019", raw)
    (raw / isic2019.GROUND_TRUTH_FILE).write_text("image,MEL\nSYN_x,1\n")
    with pytest.raises(DataError, match=isic2019.GROUND_TRUTH_FILE):
        dataset_scripts.load("isic2019", raw)


def test_train_and_evaluate_refuse_a_test_only_source(tmp_path):
    import argparse

    import evaluate_model
    from train import load_data
    from trainer.arguments import DataArguments

    with pytest.raises(ValueError, match="'isic2024' has only \\['test'\\]: train on one of"):
        load_data(DataArguments(dataset_name="isic2024", data_dir=str(tmp_path)), training_args=None)
    args = argparse.Namespace(seed_split=None, synthetic_num_images=None, isic2024_metadata_file=None,
                              isic2024_image_file=None, max_samples=None)
    with pytest.raises(ValueError, match="use --split test"):
        evaluate_model.load_split("isic2024", tmp_path, "validation", args)
