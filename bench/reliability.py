# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Bad and odd inputs across the four entry points, and what each gets (docs/reliability.md).

    python -m bench.reliability                       # print the table
    python -m bench.reliability --write docs/reliability.md   # and replace the table in that file

Every case runs the real entry point in this process (`dataset_scripts.prepare.main`, `train.parse_args` /
`train.load_data` / `train.run` up to the first error, `predict.main`, `evaluate_model.main`) on files written into a
temporary folder: a toy ISIC 2019 download, tiny random components, a saved (untrained) adapter model. The "gets"
column is the observed outcome (exit code, exception and its first line, or warnings), not a description. A case whose
outcome does not match its expectation is marked FAIL and the script exits 1. Takes a few minutes on 2 CPU cores.
"""

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
GT = "ISIC_2019_Training_GroundTruth.csv"
META = "ISIC_2019_Training_Metadata.csv"
IMAGES = "ISIC_2019_Training_Input"


def noise(size=64, seed=0, mode="RGB"):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8)).convert(mode)


def toy_isic2019(folder: Path, n=40, edit=None, classes=8) -> Path:
    """A toy ISIC 2019 download: `n` images, two per lesion, the first `classes` classes; `edit(gt, meta, image_dir)`
    changes the CSV lines or the images before the CSVs are written."""
    image_dir = folder / IMAGES
    image_dir.mkdir(parents=True)
    gt = ["image," + ",".join(CLASSES)]
    meta = ["image,age_approx,anatom_site_general,lesion_id,sex"]
    for i in range(n):
        iid, label = f"ISIC_{i:07d}", CLASSES[(i // 2) % classes]
        gt.append(iid + "," + ",".join("1.0" if c == label else "0.0" for c in CLASSES))
        meta.append(f"{iid},{30 + 5 * (i % 10)},anterior torso,L{i // 2},female")
        noise(32, seed=i).save(image_dir / f"{iid}.jpg", quality=90)
    if edit is not None:
        edit(gt, meta, image_dir)
    (folder / GT).write_bytes(("\r\n".join(gt) + "\r\n").encode("utf-8", "surrogateescape"))
    (folder / META).write_bytes(("\r\n".join(meta) + "\r\n").encode("utf-8", "surrogateescape"))
    return folder


def truncate(path: Path, keep=1 / 3):
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])


def big_jpeg(path: Path, size=96):
    noise(size, seed=5).save(path, quality=95)


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_case(fn):
    """`(status, text)`: status is 'ok', 'exit N' or the exception class; text the first line of what was said."""
    err, out = io.StringIO(), io.StringIO()
    recorder = Recorder()
    logging.getLogger().addHandler(recorder)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            value = fn()
        status, text = "ok", "" if value is None else str(value)
        if isinstance(value, int) and not isinstance(value, bool) and value != 0:
            said = [line for line in err.getvalue().splitlines() if line.strip()]
            status, text = f"exit {value}", said[-1] if said else ""
    except SystemExit as exc:
        status = f"exit {exc.code if isinstance(exc.code, int) else 1}"
        text = exc.code if isinstance(exc.code, str) else err.getvalue().strip().splitlines()[-1:] or [""]
        text = text if isinstance(text, str) else text[0]
    except Exception as exc:  # noqa: BLE001 - the outcome is what we record
        status, text = type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    finally:
        logging.getLogger().removeHandler(recorder)
    warnings = [m for m in recorder.messages if m]
    warnings += [line for line in err.getvalue().splitlines() if line.startswith("warning:")]
    return status, text, warnings


def shorten(text: str, limit=150) -> str:
    text = re.sub(r"/tmp/rel-[a-z0-9_]+", "<tmp>", str(text))
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_cases(root: Path) -> list:
    """`[(entry point, input, expectation regex on 'status: text | warnings', callable)]`."""
    import evaluate_model
    import predict
    import train
    from dataset_scripts import prepare
    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis
    from processing_skinclip_vl import SkinCLIPVLProcessor
    from tools.tiny_components import write_tiny_components

    components = write_tiny_components(root / "components", seed=0)
    model_dir = root / "model"
    model = SkinCLIPVLForDiagnosis.from_components(components["vision"], components["decoder"])
    model.apply_lora(verbose=False)
    model.save_pretrained(model_dir)
    SkinCLIPVLProcessor.from_components(components["vision"], components["decoder"]).save_pretrained(model_dir)
    counter = iter(range(10**6))

    def fresh(name="case") -> Path:
        path = root / f"{name}{next(counter)}"
        path.mkdir()
        return path

    def prep(*flags, edit=None, n=160, raw=None):
        def go():
            data = raw or toy_isic2019(fresh("raw"), n=n, edit=edit)
            out = fresh() / "out"
            rc = prepare.main(["--dataset", "isic2019", "--data_dir", str(data), "--output_dir", str(out), *flags])
            summary = json.loads((out / "summary.json").read_text())
            rows = {k: v["total"] for k, v in summary["rows"].items()}
            said = [f"{s['count']} x {s['reason']}" for s in summary["skips"] + summary["notes"]]
            return f"rc {rc}, rows {rows}" + (f"; {'; '.join(said)}" if said else "")
        return go

    def edit_image(index, how):
        def edit(gt, meta, image_dir):
            path = image_dir / f"ISIC_{index:07d}.jpg"
            how(path)
        return edit

    def edit_meta(index, old, new):
        def edit(gt, meta, image_dir):
            meta[index + 1] = meta[index + 1].replace(old, new)
        return edit

    def rename_id(new):
        def edit(gt, meta, image_dir):
            gt[2] = gt[2].replace("ISIC_0000001", new)
            meta[2] = meta[2].replace("ISIC_0000001", new)
        return edit

    def bomb():
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = 400
        try:
            return prep()()
        finally:
            Image.MAX_IMAGE_PIXELS = saved

    cases = []

    def add(entry, what, expect, fn):
        cases.append((entry, what, expect, fn))

    # ---------------------------------------------------------------- prepare
    P = "prepare"
    add(P, "a good toy ISIC 2019 folder (160 images, 80 lesions)", r"^ok: rc 0", prep())
    add(P, "the same with --num_proc 2", r"^ok: rc 0", prep("--num_proc", "2"))
    add(P, "--format parquet", r"^ok: rc 0", prep("--format", "parquet"))
    add(P, "an image file missing", r"DataError: .*line 4 \(ISIC_0000002\).*not found",
        prep(edit=edit_image(2, lambda p: p.unlink())))
    add(P, "an image file missing, --skip_bad_images", r"1 x image file missing",
        prep("--skip_bad_images", edit=edit_image(2, lambda p: p.unlink())))
    add(P, "a file that is not an image", r"DataError: .*ISIC_0000003.*cannot identify",
        prep(edit=edit_image(3, lambda p: p.write_bytes(b"not a jpeg"))))
    add(P, "a zero-byte image", r"DataError: .*ISIC_0000003",
        prep(edit=edit_image(3, lambda p: p.write_bytes(b""))))
    add(P, "a JPEG cut to a third of its bytes", r"(?i)DataError: .*ISIC_0000004.*truncated",
        prep(edit=edit_image(4, lambda p: (big_jpeg(p), truncate(p)))))
    add(P, "the truncated JPEG, --skip_bad_images", r"1 x image file unreadable",
        prep("--skip_bad_images", edit=edit_image(4, lambda p: (big_jpeg(p), truncate(p)))))
    add(P, "images over the decompression-bomb limit (MAX_IMAGE_PIXELS lowered to 400)",
        r"DataError: .*decompression bomb", bomb)
    add(P, "a PNG saved under a .jpg name", r"^ok: rc 0", prep(edit=edit_image(5, lambda p: noise(32).save(p, "PNG"))))
    add(P, "a 16-bit grey PNG under a .jpg name", r"^ok: rc 0",
        prep(edit=edit_image(5, lambda p: Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(p, "PNG"))))
    add(P, "an image file name in other case (isic_0000006.JPG)", r"1 x image found by case-insensitive",
        prep(edit=edit_image(6, lambda p: p.rename(p.with_name("isic_0000006.JPG")))))
    add(P, "metadata CSV not UTF-8 (Latin-1 byte on line 4)", r"DataError: .*Metadata\.csv, line 4: not UTF-8",
        prep(edit=edit_meta(2, "female", "f\udce9male")))
    add(P, "metadata age 'abc'", r"1 x metadata value not understood \(used as unknown\): age",
        prep(edit=edit_meta(1, ",35,", ",abc,")))
    add(P, "metadata site 'moon'", r"1 x metadata value not understood \(used as unknown\): site",
        prep(edit=edit_meta(1, "anterior torso", "moon")))
    add(P, "metadata age 300", r"metadata value not understood \(used as unknown\): age",
        prep(edit=edit_meta(1, ",35,", ",300,")))
    add(P, "metadata sex 'x'", r"metadata value not understood \(used as unknown\): sex",
        prep(edit=edit_meta(1, "female", "x")))
    add(P, "ground-truth row with one field too many", r"DataError: .*GroundTruth\.csv, line 3: 11 fields",
        prep(edit=lambda gt, meta, d: gt.__setitem__(2, gt[2] + ",1.0")))
    add(P, "metadata CSV without the sex column", r"DataError: .*missing column",
        prep(edit=lambda gt, meta, d: meta.__setitem__(slice(None), [m.rsplit(",", 1)[0] for m in meta])))
    add(P, "image id '../escape'", r"DataError: .*outside the image folder", prep(edit=rename_id("../escape")))
    add(P, "image id '/etc/hostname'", r"DataError: .*outside the image folder", prep(edit=rename_id("/etc/hostname")))
    add(P, "6 images (some splits empty)", r"warning: the (validation|test) split is empty", prep(n=6))
    add(P, "--dataset isic2019 without --data_dir", r"exit 1: --data_dir is required",
        lambda: prepare.main(["--dataset", "isic2019", "--output_dir", str(fresh() / "out")]))
    add(P, "--data_dir that does not exist", r"DataError: .*file not found",
        lambda: prepare.main(["--dataset", "isic2019", "--data_dir", str(root / "nope"), "--output_dir",
                              str(fresh() / "out")]))
    add(P, "--output_dir under /proc (unwritable)", r"exit 1: .*--output_dir /proc/skinclip_out",
        lambda: prepare.main(["--dataset", "isic2019", "--data_dir", str(toy_isic2019(fresh("raw"), n=4)),
                              "--output_dir", "/proc/skinclip_out"]))
    add(P, "--output_dir that exists and is not empty", r"exit 2", lambda: prepare.main(
        ["--dataset", "isic2019", "--data_dir", str(root), "--output_dir", str(root)]))
    for flags, name in ((["--train_fraction", "0"], "--train_fraction"), (["--num_proc", "0"], "--num_proc"),
                        (["--split_fractions", "0.5", "0.5", "nan"], "--split_fractions"),
                        (["--synthetic_num_images", "-3"], "--synthetic_num_images"),
                        (["--seed_split", "1.5"], "--seed_split")):
        add(P, " ".join(flags), rf"exit 2: .*argument {name}", lambda f=flags: prepare.main(
            ["--dataset", "synthetic", "--output_dir", str(fresh() / "out"), *f]))

    # ---------------------------------------------------------------- train.py
    T = "train.py"

    def parse(*flags):
        return lambda: train.parse_args(["--output_dir", str(fresh() / "run"), "--report_to", "none", *flags]) and None

    for flags in (["--lora_r", "0"], ["--lora_alpha", "0"], ["--lora_dropout", "1"], ["--lambda_gen", "nan"],
                  ["--lambda_align", "-1"], ["--lambda_calibration", "inf"], ["--focal_loss_gamma", "-2"],
                  ["--learning_rate", "nan"], ["--train_fraction", "1.5"], ["--max_length", "0"],
                  ["--synthetic_num_images", "0"], ["--per_device_train_batch_size", "0"], ["--n_bootstrap", "-1"]):
        add(T, " ".join(flags), rf"ValueError: {flags[0]} must", parse(*flags))

    def load(*flags):
        def go():
            _, data_args, training_args = train.parse_args(
                ["--output_dir", str(fresh() / "run"), "--report_to", "none", *flags])
            data = train.load_data(data_args, training_args)
            return {k: len(v) for k, v in data.items()}
        return go

    add(T, "--dataset_name isic2019 without --data_dir", r"ValueError: --data_dir is required", load(
        "--dataset_name", "isic2019"))
    add(T, "--dataset_name isic2024 (a test-only source)", r"ValueError: .*has only \['test'\]", load(
        "--dataset_name", "isic2024", "--data_dir", str(root)))
    add(T, "--dataset_name nope", r"ValueError: unknown dataset 'nope'", load("--dataset_name", "nope"))
    add(T, "a 6-image download (empty validation split)", r"ValueError: The 'validation' split .* is empty", load(
        "--dataset_name", "isic2019", "--data_dir", str(toy_isic2019(fresh("raw"), n=6))))
    add(T, "a download without VASC / SCC rows", r"absent from the training split", load(
        "--dataset_name", "isic2019", "--data_dir", str(toy_isic2019(fresh("raw"), n=160, classes=6))))
    add(T, "a JPEG truncated after prepare-time checks, reaching the collator",
        r"(?i)ValueError: image ISIC_0000000 \(row \d+\).*truncated", lambda: _collate_truncated(root, components))

    def resume(setup):
        def go():
            checkpoint = fresh() / "checkpoint-2"
            checkpoint.mkdir()
            setup(checkpoint)
            model_args, data_args, training_args = train.parse_args(
                ["--output_dir", str(fresh() / "run"), "--report_to", "none", "--resume_from_checkpoint",
                 str(checkpoint)])
            return train.run(model_args, data_args, training_args)
        return go

    def corrupt_optimizer(folder):
        import torch

        torch.save({"x": torch.zeros(1000)}, folder / "optimizer.pt")
        truncate(folder / "optimizer.pt", 0.5)

    add(T, "--resume_from_checkpoint with a truncated optimizer.pt", r"ValueError: .*optimizer\.pt is corrupt",
        resume(corrupt_optimizer))
    add(T, "--resume_from_checkpoint with a truncated model.safetensors", r"ValueError: .*model\.safetensors is corrupt",
        resume(lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")))
    add(T, "--resume_from_checkpoint with trainer_state.json not JSON", r"ValueError: .*trainer_state\.json is corrupt",
        resume(lambda f: (f / "trainer_state.json").write_text("{oops")))
    add(T, "--resume_from_checkpoint that does not exist", r"ValueError: .*does not exist",
        lambda: train.run(*train.parse_args(["--output_dir", str(fresh()), "--report_to", "none",
                                             "--resume_from_checkpoint", str(root / "checkpoint-404")])))
    add(T, "a YAML config with an unknown key", r"ValueError: .*unknown argument\(s\) \['lora_rank'\]",
        lambda: train.parse_args([str(_write(fresh() / "c.yaml", "lora_rank: 8\n"))]))
    add(T, "--output_dir under /proc (unwritable)", r"ValueError: --output_dir /proc/skinclip_run",
        lambda: train.run(*train.parse_args(["--output_dir", "/proc/skinclip_run", "--report_to", "none"])))

    # ---------------------------------------------------------------- predict.py
    R = "predict.py"
    images = fresh("images")
    noise(64, seed=1).save(images / "good.png")
    Image.fromarray((np.asarray(noise(64, 2).convert("L"), np.uint16) * 257)).save(images / "grey16.png")
    noise(64, 3).convert("CMYK").save(images / "cmyk.jpg")
    noise(64, 4).convert("P").save(images / "palette.png", transparency=0)
    big_jpeg(images / "truncated.jpg")
    truncate(images / "truncated.jpg")
    (images / "text.jpg").write_text("not an image")
    noise(8, 5).save(images / "tiny.png")
    Image.new("RGB", (64, 64), (190, 140, 120)).save(images / "blank.png")
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(images / "transparent.png")

    def pred(*flags, show="warnings", image=None):
        def go():
            out = fresh()
            args = ["--model", str(model_dir), "--output_dir", str(out), "--no_rationale", *flags]
            if image is not None:
                args += ["--image", str(images / image)]
            rc = predict.main(args)
            if (out / "summary.csv").is_file():
                with open(out / "summary.csv", newline="") as handle:
                    rows = list(csv.DictReader(handle))
                said = [f"{Path(r['image']).name}: {r['status']} {r['error'] or r['warnings']}".strip() for r in rows
                        if r["status"] != "ok" or r["warnings"]]
                return f"rc {rc}; " + "; ".join(said)
            written = sorted(out.glob("*.json"))
            if not written:
                return rc
            record = json.loads(written[0].read_text())
            return f"rc {rc}; metadata {record['metadata']}; warnings {record['warnings']}"
        return go

    add(R, "a good PNG", r"^ok: rc 0; metadata .*warnings \[\]", pred(image="good.png"))
    add(R, "a 16-bit grey PNG", r"^ok: rc 0; .*warnings \[\]", pred(image="grey16.png"))
    add(R, "a CMYK JPEG", r"^ok: rc 0; .*warnings \[\]", pred(image="cmyk.jpg"))
    add(R, "a palette PNG with transparency", r"^ok: rc 0", pred(image="palette.png"))
    add(R, "an 8 x 8 image", r"image is tiny \(8 x 8 px", pred(image="tiny.png"))
    add(R, "a one-colour image", r"image is blank", pred(image="blank.png"))
    add(R, "a fully transparent PNG", r"fully transparent", pred(image="transparent.png"))
    add(R, "a truncated JPEG (--image)", r"exit 1", pred(image="truncated.jpg"))
    add(R, "--images_dir with truncated, non-image, tiny, blank, transparent files",
        r"(?=.*truncated\.jpg: error .*truncated)(?=.*text\.jpg: error)(?=.*tiny\.png: ok .*tiny)(?=.*blank\.png: ok .*blank)"
        r"(?=.*transparent\.png: ok .*transparent)", pred("--images_dir", str(images)))
    add(R, "--age 300 --sex x --site moon", r"'age': None, 'sex': None, 'site': None.*age 300.*sex 'x'.*site 'moon'",
        pred("--age", "300", "--sex", "x", "--site", "moon", image="good.png"))
    add(R, "--age -5", r"'age': None.*age -5", pred("--age", "-5", image="good.png"))
    add(R, "--site upper_extremity --sex F", r"'sex': 'female', 'site': 'upper extremity'.*warnings \[\]",
        pred("--site", "upper_extremity", "--sex", "F", image="good.png"))
    table = fresh("csv")
    shutil.copy(images / "good.png", table / "good.png")
    (table / "cases.csv").write_text("image,age,sex,site\ngood.png,abc,female,back\nmissing.png,40,male,back\n")
    add(R, "--csv with age 'abc' and a missing file", r"(?=.*good\.png: ok .*age 'abc')(?=.*missing\.png: error)",
        pred("--csv", str(table / "cases.csv")))
    (table / "latin1.csv").write_bytes(b"image,site\ngood.png,t\xeate\n")
    add(R, "--csv not UTF-8", r"exit 1: --csv .*latin1\.csv, line 2: not UTF-8", pred("--csv", str(table / "latin1.csv")))
    (table / "nocol.csv").write_text("picture,age\ngood.png,40\n")
    add(R, "--csv without an image column", r"exit 1: .*needs one of the columns", pred("--csv", str(table / "nocol.csv")))
    add(R, "--images_dir that is not a folder", r"exit 1: .*is not a directory", pred("--images_dir", str(root / "x")))
    for flags in (["--age", "nan"], ["--max_new_tokens", "0"], ["--batch_size", "0"], ["--age", "inf"]):
        add(R, " ".join(flags), rf"exit 2: .*argument {flags[0]}", pred(*flags, image="good.png"))

    def broken_model(damage):
        def go():
            target = fresh() / "model"
            shutil.copytree(model_dir, target)
            damage(target)
            return predict.load_model(str(target)) and None
        return go

    add(R, "--model that does not exist", r"ValueError: model path .* does not exist",
        lambda: predict.load_model(str(root / "no_such_model")))
    add(R, "--model without config.json", r"ValueError: .*config\.json is missing",
        broken_model(lambda m: (m / "config.json").unlink()))
    add(R, "--model with config.json not JSON", r"ValueError: .*config\.json is corrupt",
        broken_model(lambda m: (m / "config.json").write_text("{")))
    add(R, "--model without adapter/", r"ValueError: .*adapter/ is missing",
        broken_model(lambda m: shutil.rmtree(m / "adapter")))
    add(R, "--model with a truncated adapter_model.safetensors", r"ValueError: .*adapter_model\.safetensors is corrupt",
        broken_model(lambda m: truncate(m / "adapter" / "adapter_model.safetensors", 0.5)))
    add(R, "--model moved to another folder, run from another working directory", r"^ok",
        lambda: _moved_model(model_dir, fresh(), images / "good.png"))

    # ---------------------------------------------------------------- evaluate_model.py
    E = "evaluate_model.py"
    toy = toy_isic2019(fresh("raw"), n=160)  # 80 lesions: every split has rows

    def ev(*flags):
        return lambda: evaluate_model.main(["--model", str(model_dir), *flags])

    add(E, "toy ISIC 2019 test split, --n_bootstrap 0", r"^ok",
        ev("--dataset", "isic2019", "--data_dir", str(toy), "--n_bootstrap", "0"))
    add(E, "--dataset isic2019 without --data_dir", r"ValueError: --data_dir is required", ev("--dataset", "isic2019"))
    add(E, "--split validation on isic2024", r"ValueError: .*(out-of-distribution|has no 'validation')",
        ev("--dataset", "isic2024", "--data_dir", str(root), "--split", "validation"))
    add(E, "a 6-image download (empty test split)", r"ValueError: The 'test' split .* is empty",
        ev("--dataset", "isic2019", "--data_dir", str(toy_isic2019(fresh("raw"), n=6))))
    add(E, "--threshold_from 2", r"exit 2: .*argument --threshold_from: a threshold is", ev(
        "--dataset", "isic2019", "--data_dir", str(toy), "--n_bootstrap", "0", "--threshold_from", "2"))
    add(E, "--output_json under /proc (unwritable)", r"exit 1: --output_json /proc/x/report\.json", ev(
        "--dataset", "isic2019", "--data_dir", str(toy), "--output_json", "/proc/x/report.json"))
    add(E, "--model that does not exist", r"ValueError: model path .* does not exist", lambda: evaluate_model.main(
        ["--model", str(root / "none"), "--dataset", "isic2019", "--data_dir", str(toy), "--n_bootstrap", "0"]))
    for flags in (["--n_bootstrap", "-1"], ["--batch_size", "0"], ["--max_samples", "0"], ["--seed_split", "-1"]):
        add(E, " ".join(flags), rf"exit 2: .*argument {flags[0]}", ev("--dataset", "isic2019", *flags))
    return cases


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _collate_truncated(root: Path, components: dict):
    """A row whose file was damaged after `prepare` reaches the training collator (images are decoded there)."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    from processing_skinclip_vl import SkinCLIPVLProcessor
    from trainer.collator import SkinCLIPVLCollator

    path = root / "late.jpg"
    big_jpeg(path)
    truncate(path)
    ds = Dataset.from_dict(
        {"image": [{"path": str(path), "bytes": None}], "image_id": ["ISIC_0000000"], "label": [0], "meta_text": [""],
         "report": [""], "align_text": [""], "group_id": ["L0"], "row_index": [17]},
        features=Features({"image": ImageFeature(decode=False), "image_id": Value("string"), "label": Value("int64"),
                           "meta_text": Value("string"), "report": Value("string"), "align_text": Value("string"),
                           "group_id": Value("string"), "row_index": Value("int64")}),
    )
    processor = SkinCLIPVLProcessor.from_components(components["vision"], components["decoder"])
    return SkinCLIPVLCollator(processor)([ds[0]])


def _moved_model(model_dir: Path, workdir: Path, image: Path):
    import predict

    moved = workdir / "moved_model"
    shutil.copytree(model_dir, moved)
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        rc = predict.main(["--model", "moved_model", "--image", str(image), "--output_dir", "o", "--no_rationale"])
    finally:
        os.chdir(previous)
    recorded = json.loads((moved / "config.json").read_text())["vision_model_name_or_path"]
    return f"rc {rc}; components recorded as {recorded!r}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", default=None, help="replace the table between the markers of this Markdown file")
    parser.add_argument("--only", default=None, help="run only the cases of this entry point")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="rel-"))
    failures, lines = 0, ["| # | entry point | input | gets | as expected |", "|---|---|---|---|---|"]
    try:
        cases = build_cases(root)
        for number, (entry, what, expect, fn) in enumerate(cases, start=1):
            if args.only and entry != args.only:
                continue
            status, text, warnings = run_case(fn)
            outcome = f"{status}: {text}" + (f" / warnings: {' / '.join(warnings)}" if warnings else "")
            ok = re.search(expect, outcome, flags=re.S) is not None
            failures += not ok
            lines.append(f"| {number} | {entry} | {shorten(what, 90)} | {shorten(outcome, 220)} | "
                         f"{'yes' if ok else 'FAIL'} |")
            print(lines[-1], flush=True)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 2
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{len(lines) - 2} cases, {failures} not as expected")
    if args.write:
        path = Path(args.write)
        text = path.read_text()
        start, end = "<!-- table: python -m bench.reliability --write docs/reliability.md -->", "<!-- end of table -->"
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        path.write_text(before + start + "\n" + "\n".join(lines) + "\n" + end + after)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
