#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""`make demo` (the `train.py` demo preset) over several training seeds and split seeds: is its result stable?

    python -m bench.demo_stability --seeds 0,1,2            # seed s trains with seed = seed_split = s

Every run is the demo preset unchanged except `seed` / `seed_split` and the output folder; the synthetic pool and the
tiny components are the demo's own (`outputs/data/...`, `outputs/components/`), so seed 0 is `make demo` itself.
Prints a markdown table (test balanced accuracy with and without metadata, ECE before / after temperature, the
temperature, the selected epoch, per-class sensitivity) and the mean ± sd, and writes `--output_json`.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def run_demo(seed: int, output_root: Path) -> dict:
    from transformers import HfArgumentParser

    import train
    from tools.demo_components import ensure_demo_components
    from trainer.arguments import CFATrainingArguments, DataArguments, ModelArguments

    preset = dict(train.DEMO_PRESET)
    demo_root = Path(preset["output_dir"]).parent  # outputs/: the demo's data and components
    components = ensure_demo_components(demo_root / "components")
    data_dir = demo_root / "data" / "synthetic"  # where `make demo` generates it (train.load_data)
    values = {**preset, "seed": seed, "seed_split": seed, "output_dir": str(output_root / f"seed{seed}"),
              "data_dir": str(data_dir), "vision_model_name_or_path": components["vision"],
              "decoder_name_or_path": components["decoder"], "disable_tqdm": True}
    parser = HfArgumentParser((ModelArguments, DataArguments, CFATrainingArguments))
    start = time.time()
    report = train.run(*parser.parse_dict(values))
    test = report["test"]
    checkpoints = sorted((output_root / f"seed{seed}").glob("checkpoint-*/trainer_state.json"),
                         key=lambda p: int(p.parent.name.split("-")[1]))
    history = json.loads(checkpoints[-1].read_text()) if checkpoints else {}
    return {
        "seed": seed, "seed_split": seed, "balanced_accuracy": test["balanced_accuracy"],
        "image_only_balanced_accuracy": report["test_image_only"]["balanced_accuracy"],
        "macro_auroc": test["macro_auroc"], "ece": test["ece"], "ece_before_temperature": test["ece_before_temperature"],
        "temperature": report["temperature"], "test_rows": test["n_samples"],
        "best_checkpoint": history.get("best_model_checkpoint"), "best_validation_balanced_accuracy":
        history.get("best_metric"),
        "per_class_sensitivity": {k: v["sensitivity"] for k, v in test["per_class"].items()},
        "per_class_support": {k: v["support"] for k, v in test["per_class"].items()},
        "seconds": round(time.time() - start, 1),
    }


# the old demo preset's test split (10% of 2,000 images, seed 0): rows per class (docs/results.md before issue 11)
OLD_TEST_COUNTS = {"MEL": 35, "NV": 102, "BCC": 22, "AK": 7, "BKL": 19, "DF": 2, "VASC": 2, "SCC": 5}


def test_split_noise(predictions, n_draws: int = 2000, seed: int = 0) -> dict:
    """Spread of the test balanced accuracy that the test split alone causes, for one model's test predictions.

    `predictions`: a `predictions.npz` of `bench.reproduce` (test logits and labels of a large class-balanced test
    split). Draws test splits of the old demo's per-class sizes (`OLD_TEST_COUNTS`, without replacement) and of the
    new one's (60 per class, with replacement), and returns the sd of balanced accuracy over the draws and the
    fraction of old-size draws at or below 0.45."""
    import numpy as np

    from configuration_skinclip_vl import ISIC2019_CLASSES

    arrays = np.load(predictions)
    labels, pred = arrays["test_labels"], arrays["test_logits"].argmax(1)
    rng = np.random.default_rng(seed)
    members = {c: np.flatnonzero(labels == i) for i, c in enumerate(ISIC2019_CLASSES)}
    out = {}
    for name, counts, replace in (("old_split", OLD_TEST_COUNTS, False), ("held_out_60", dict.fromkeys(members, 60),
                                                                          True)):
        values = []
        for _ in range(n_draws):
            recalls = []
            for c, n in counts.items():
                rows = rng.choice(members[c], size=n, replace=replace or n > len(members[c]))
                recalls.append(float(np.mean(pred[rows] == ISIC2019_CLASSES.index(c))))
            values.append(float(np.mean(recalls)))
        values = np.asarray(values)
        out[name] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)),
                     "share_at_or_below_0.45": float(np.mean(values <= 0.45))}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--output_dir", default="outputs/demo_stability")
    parser.add_argument("--output_json", default=None, help="Default: OUTPUT_DIR/demo_stability.json.")
    parser.add_argument("--test_noise_from", nargs="*", default=None, metavar="PREDICTIONS_NPZ",
                        help="Only measure the test-split noise on these bench.reproduce predictions (no training).")
    args = parser.parse_args(argv)
    if args.test_noise_from:
        result = {path: test_split_noise(path) for path in args.test_noise_from}
        for path, r in result.items():
            print(f"{path}: " + "; ".join(f"{k}: B-ACC {v['mean']:.3f} ± {v['sd']:.3f}, <= 0.45 in "
                                          f"{100 * v['share_at_or_below_0.45']:.1f}% of draws" for k, v in r.items()))
        print(json.dumps(result))
        return 0
    runs = [run_demo(int(s), Path(args.output_dir)) for s in args.seeds.split(",")]
    keys = ("balanced_accuracy", "image_only_balanced_accuracy", "ece_before_temperature", "ece")
    summary = {}
    for key in keys:
        values = [r[key] for r in runs]
        summary[key] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}
    classes = list(runs[0]["per_class_sensitivity"])
    print("| seed = seed_split | B-ACC | image-only B-ACC | ECE before T | ECE after T | T | best val B-ACC | "
          + " | ".join(classes) + " |")
    print("|---" * (7 + len(classes)) + "|")
    for r in runs:
        print(f"| {r['seed']} | {r['balanced_accuracy']:.3f} | {r['image_only_balanced_accuracy']:.3f} | "
              f"{r['ece_before_temperature']:.3f} | {r['ece']:.3f} | {r['temperature']:.3f} | "
              f"{(r['best_validation_balanced_accuracy'] or float('nan')):.3f} | "
              + " | ".join(f"{r['per_class_sensitivity'][c]:.2f}" for c in classes) + " |")
    print("mean ± sd: " + ", ".join(f"{k} {v['mean']:.3f} ± {v['sd'] if v['sd'] is None else round(v['sd'], 3)}"
                                    for k, v in summary.items()))
    out = Path(args.output_json or Path(args.output_dir) / "demo_stability.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python -m bench.demo_stability " + " ".join(sys.argv[1:]),
                               "runs": runs, "summary": summary}, indent=2))
    print(json.dumps({k: v for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
