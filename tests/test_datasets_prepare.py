"""The prepare CLI end to end on synthetic data (and its atomic failure)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_dataset, load_from_disk

from dataset_scripts import DataError
from dataset_scripts.prepare import main
from dataset_scripts.schema import FEATURES

REPO = Path(__file__).resolve().parents[1]


def test_prepare_synthetic_then_its_isic_and_derm7pt_layouts(tmp_path, capsys):
    out = tmp_path / "syn"
    args = ["--dataset", "synthetic", "--output_dir", str(out), "--synthetic_num_images", "48"]
    assert main([*args, "--synthetic_image_size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "validation:" in printed and "test:" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "synthetic" and summary["data_dir"] == str(out / "raw" / "isic2019")
    assert sum(s["total"] for s in summary["rows"].values()) == 48
    dd = load_from_disk(str(out))
    assert dd["train"].features == FEATURES
    row = dd["train"][0]
    assert row["image"].size == (64, 64) and row["criteria"] is not None
    # images are embedded, not paths into the raw folder
    assert dd["train"].with_format("arrow")[:1]["image"][0]["bytes"].as_py()

    out2 = tmp_path / "isic"
    assert main(["--dataset", "isic2019", "--data_dir", str(out / "raw" / "isic2019"), "--output_dir", str(out2),
                 "--format", "parquet"]) == 0
    pq = load_dataset("parquet", data_dir=str(out2 / "data"), cache_dir=str(tmp_path / "cache"))
    assert sum(len(v) for v in pq.values()) == 48
    assert pq["train"][0]["image"].size == (64, 64)

    out3 = tmp_path / "derm"
    assert main(["--dataset", "derm7pt", "--data_dir", str(out / "raw" / "derm7pt"), "--output_dir", str(out3)]) == 0
    printed = capsys.readouterr().out
    s3 = json.loads((out3 / "summary.json").read_text())
    for ex in s3["exclusions"]:
        assert f"excluded: {ex['count']} x {ex['reason']}" in printed


def test_prepare_failure_leaves_nothing(tmp_path):
    raw = tmp_path / "raw"
    from dataset_scripts import synthetic

    synthetic.generate(raw, num_images=24, seed=0, image_size=32, write_derm7pt=False)
    victim = sorted((raw / "isic2019" / "ISIC_2019_Training_Input").glob("SYN_*[0-9].jpg"))[0]
    victim.unlink()
    out = tmp_path / "out"
    with pytest.raises(DataError, match=victim.stem):
        main(["--dataset", "isic2019", "--data_dir", str(raw / "isic2019"), "--output_dir", str(out)])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no temp folder left either
    assert main(["--dataset", "isic2019", "--data_dir", str(raw / "isic2019"), "--output_dir", str(out),
                 "--skip_bad_images"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skips"] == [{"reason": "image file missing", "count": 1, "examples": [victim.stem]}]


def test_prepare_module_runs_as_a_script(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "dataset_scripts.prepare", "--dataset", "synthetic", "--output_dir",
         str(tmp_path / "o"), "--synthetic_num_images", "24", "--synthetic_image_size", "32", "--data_dir",
         str(tmp_path / "raw")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dataset: synthetic" in res.stdout and (tmp_path / "raw" / "generation.json").is_file()
    res = subprocess.run([sys.executable, "-m", "dataset_scripts.prepare", "--dataset", "synthetic", "--output_dir",
                          str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not empty" in res.stderr
