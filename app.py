#!/usr/bin/env python
# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""Web demo of a trained SkinCLIP-VL (Gradio; the Hugging Face Spaces entry point).

    python app.py                                   # the demo model, outputs/demo/model (`make demo` writes it)
    python app.py --model org/adapter-repo --port 7861

One image (upload or a synthetic example) plus optional age, sex and anatomical site gives: the calibrated class
probabilities (with the temperature in use), the generated rationale with its grounded clinical terms highlighted
(click a term to see its map), the overlays of every term map, the focal-pooling map and Grad-CAM, the warnings of
`diagnose()`, and the JSON record that `predict.py` writes (built by `predict.write_outputs`, so it is the same).
The overlays are drawn by `drawing.py`, the drawing module `predict.py` uses.

Bad input (no image, a file that is not an image, an image too large, an age out of range) gets a readable message
in the page and the app keeps serving. Research software, not a medical device.
"""

import argparse
import atexit
import csv
import html
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger("app")

DEFAULT_MODEL = "outputs/demo/model"
DEFAULT_EXAMPLES_DIR = "outputs/app_examples"
EXAMPLES_SEED = 7  # not the demo's data seeds: the examples are fresh synthetic lesions, never clinical images
EXAMPLE_CLASSES = ("MEL", "NV", "BCC", "BKL")
MAX_PIXELS = 25_000_000  # larger images are refused with a message (ISIC images reach 24 MP; overlays are full size)
MAX_FILE_SIZE = "25mb"  # Gradio refuses larger uploads in the browser with its own message
KEEP_RESULTS = 16  # per-request result folders kept on disk (older ones are deleted)
UNKNOWN = "unknown"
SEXES = (UNKNOWN, "female", "male")
BANNER = (
    "**Research software, not a medical device.** SkinCLIP-VL is a research model: its probabilities, rationales "
    "and maps must not be used to diagnose, treat or triage anyone. The demo model is trained on procedural "
    "synthetic images only."
)


class InputError(ValueError):
    """A problem with what the user submitted; its message is shown in the page as it is."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="saved model directory or Hub repo id")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve on the network (e.g. in a Space)")
    parser.add_argument("--examples_dir", default=DEFAULT_EXAMPLES_DIR,
                        help="where the synthetic example images are generated (once)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="rationale length limit")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--revision", default=None)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


def site_choices() -> list:
    """The canonical anatomical sites (ISIC 2019 `anatom_site_general` values), `unknown` first."""
    from dataset_scripts.synthetic import SITES

    return [UNKNOWN, *sorted(SITES)]


def read_upload(path, name: str):
    """Open an uploaded file with the repository's one image loader; refuse non-images and huge images readably.

    Args:
        path: the uploaded file on disk.
        name (`str`): the name the user uploaded it under (used in messages).

    Returns:
        `PIL.Image.Image` in RGB.
    """
    from PIL import Image

    from processing_skinclip_vl import load_image

    try:
        with Image.open(path) as probe:  # lazy: reads the header only
            width, height = probe.size
    except Image.DecompressionBombError as err:
        raise InputError(f"“{name}” is too large to open safely ({err}). Downscale it and try again.") from err
    except (OSError, ValueError):
        width = height = None  # load_image below names the problem
    if width is not None and width * height > MAX_PIXELS:
        raise InputError(
            f"“{name}” is {width} x {height} pixels ({width * height / 1e6:.0f} MP); this demo takes images up to "
            f"{MAX_PIXELS / 1e6:.0f} MP. Downscale it and try again (the model looks at 224 px or less)."
        )
    try:
        return load_image(path)
    except (ValueError, OSError, TypeError) as err:
        reason = err.__cause__ or err
        raise InputError(
            f"“{name}” is not an image this demo can read (JPEG, PNG, BMP, TIFF or WebP): {reason}"
        ) from err


def build_metadata(age, sex, site) -> dict:
    """The metadata dict `predict.py` builds from `--age/--sex/--site` (fields left unknown are left out)."""
    metadata = {}
    if age not in (None, ""):
        try:
            age = float(age)
        except (TypeError, ValueError) as err:
            raise InputError(f"Age must be a number of years, got {age!r}.") from err
        if not (math.isfinite(age) and 0 <= age <= 120):
            raise InputError(f"Age must be between 0 and 120 years, got {age:g}.")
        metadata["age"] = age
    if sex not in (None, "", UNKNOWN):
        metadata["sex"] = sex
    if site not in (None, "", UNKNOWN):
        metadata["site"] = site
    return metadata


def payload_path(payload):
    """`(path on disk, name the user gave it)` of an image input's raw payload (events run with preprocess=False)."""
    if payload is None:
        return None, None
    if isinstance(payload, (str, os.PathLike)):
        return str(payload), Path(payload).name
    if isinstance(payload, dict):
        path = payload.get("path")
        name = payload.get("orig_name") or (Path(path).name if path else None)
        return path, name
    return None, None


# --------------------------------------------------------------------------------------------------------------------
# Examples: fresh synthetic lesions from the repository's generator (no clinical image is shipped)
# --------------------------------------------------------------------------------------------------------------------


def write_examples(folder, classes=EXAMPLE_CLASSES, seed: int = EXAMPLES_SEED) -> list:
    """Generate (once) a small synthetic set in `folder` and return `[[image path, age, sex, site, class], ...]`,
    one per class of `classes`, with the generator's metadata."""
    from dataset_scripts import synthetic

    root = synthetic.ensure_generated(Path(folder), num_images=16, seed=seed, image_size=224, min_per_class=2,
                                      write_derm7pt=False) / "isic2019"
    with open(root / "ISIC_2019_Training_GroundTruth.csv", newline="") as handle:
        truth = {row["image"]: next(c for c in row if c != "image" and float(row[c]) == 1.0)
                 for row in csv.DictReader(handle)}
    with open(root / "ISIC_2019_Training_Metadata.csv", newline="") as handle:
        metadata = {row["image"]: row for row in csv.DictReader(handle)}
    examples = []
    for cls in classes:
        image_id = next((i for i in sorted(truth) if truth[i] == cls), None)
        if image_id is None:
            continue
        row = metadata[image_id]
        age = float(row["age_approx"]) if row["age_approx"] else None
        examples.append([str(root / "ISIC_2019_Training_Input" / f"{image_id}.jpg"), age,
                         row["sex"] or UNKNOWN, row["anatom_site_general"] or UNKNOWN, cls])
    return examples


# --------------------------------------------------------------------------------------------------------------------
# Diagnosis
# --------------------------------------------------------------------------------------------------------------------


class DemoBackend:
    r"""
    The model, its processor and the per-request result folders: `diagnose` runs one submission, `page_outputs` turns
    its result into what the page shows.

    Args:
        model: a loaded SkinCLIP-VL (`predict.load_model`).
        processor: its processor.
        model_name (`str`): what `--model` said (recorded in the JSON, as `predict.py` does).
        work_dir (`str` or `Path`): where per-request outputs go (the last `KEEP_RESULTS` are kept).
        max_new_tokens (`int`, *optional*, defaults to 64): rationale length limit.
    """

    def __init__(self, model, processor, model_name: str, work_dir, max_new_tokens: int = 64):
        self.model, self.processor, self.model_name = model, processor, model_name
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.max_new_tokens = max_new_tokens
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        self._lock = threading.Lock()
        self._count = 0

    @property
    def temperature(self):
        return self.model.config.calibration_temperature

    def class_name(self, code: str) -> str:
        from configuration_skinclip_vl import CLASS_FULL_NAMES

        return f"{code} ({CLASS_FULL_NAMES[code]})" if code in CLASS_FULL_NAMES else code

    def _request_dir(self) -> Path:
        with self._lock:
            self._count += 1
            folder = self.work_dir / f"request_{self._count:06d}"
            folder.mkdir()
            old = sorted(p for p in self.work_dir.iterdir() if p.name.startswith("request_"))[:-KEEP_RESULTS]
        for stale in old:
            shutil.rmtree(stale, ignore_errors=True)
        return folder

    def diagnose(self, image_payload, age, sex, site) -> dict:
        """Validate the inputs, diagnose, write `predict.py`'s files; return what the page shows.

        Raises `InputError` (shown as it is) for bad input.
        """
        from predict import write_outputs

        path, name = payload_path(image_payload)
        if not path:
            raise InputError("No image: upload a lesion image (or click an example) before pressing Diagnose.")
        metadata = build_metadata(age, sex, site)
        image = read_upload(path, name)
        diagnosis = self.model.diagnose([image], metadata=[metadata], processor=self.processor, rationale=True,
                                        grounding=True, max_new_tokens=self.max_new_tokens, grad_cam=True)[0]
        out_dir = self._request_dir()
        stem = Path(name).stem or "image"
        record = write_outputs(diagnosis, image, name, metadata, out_dir, stem, self.model_name)
        return {"diagnosis": diagnosis, "record": record, "out_dir": out_dir, "json_file": out_dir / f"{stem}.json"}

    def page_outputs(self, result: dict):
        """`(status, probabilities, rationale segments, term maps, gallery, warnings, json file, first term map)`."""
        diagnosis, record, out_dir = result["diagnosis"], result["record"], result["out_dir"]
        probabilities = {self.class_name(k): float(v) for k, v in diagnosis.probabilities.items()}
        status = (f"**{self.class_name(diagnosis.prediction)}**, probability {diagnosis.confidence:.3f}; "
                  f"malignancy score P(MEL) + P(BCC) + P(SCC) = {diagnosis.malignancy_score:.3f}.")
        gallery, term_maps = [], {}
        if record.get("focal_map_file"):
            gallery.append((str(out_dir / record["focal_map_file"]), "focal-pooling map"))
        if record.get("grad_cam_file"):
            gallery.append((str(out_dir / record["grad_cam_file"]), f"Grad-CAM ({diagnosis.prediction})"))
        segments, cursor = [], 0
        text = diagnosis.rationale or ""
        mentions = sorted(zip(diagnosis.grounded_terms, record["grounded_terms"]), key=lambda pair: pair[0].char_span)
        for term, entry in mentions:
            start, end = term.char_span
            if start < cursor:  # overlapping mentions: keep the first
                continue
            if start > cursor:
                segments.append((text[cursor:start], None))
            term_maps[str(len(segments))] = (str(out_dir / entry["heatmap_file"]), term.term)
            segments.append((text[start:end], term.term))
            gallery.append((str(out_dir / entry["heatmap_file"]), f"term: {term.term} ({term.text})"))
            cursor = end
        if cursor < len(text):
            segments.append((text[cursor:], None))
        if not text:
            segments = [("(no rationale was generated)", None)]
        warnings = "**Warnings**\n\n" + ("\n".join(f"- ⚠ {html.escape(w)}" for w in diagnosis.warnings)
                                          if diagnosis.warnings else "none")
        first_map = next(iter(term_maps.values()), (None, None))[0]
        return status, probabilities, segments, term_maps, gallery, warnings, str(result["json_file"]), first_map


# --------------------------------------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------------------------------------

CSS = """
#banner {border: 2px solid #b91c1c; border-radius: 6px; padding: 4px 12px; background: #fef2f2}
#status .error {color: #b91c1c}
"""


def build_demo(backend: DemoBackend, examples: list):
    """The Gradio page; `launch_demo` serves it."""
    import gradio as gr

    temperature = backend.temperature
    temperature_text = (f"temperature T = {temperature:.3f}" if temperature is not None
                        else "no temperature fitted (T = 1)")

    def on_submit(image_payload, age, sex, site):
        empty = (None, None, None, {}, [], "", None, None)
        try:
            result = backend.diagnose(image_payload, age, sex, site)
            return backend.page_outputs(result)
        except InputError as err:
            logger.info(f"refused input: {err}")
            return (f'<span class="error">⛔ {html.escape(str(err))}</span>', *empty[1:])
        except Exception as err:  # the page shows one line, the log the traceback; the app keeps serving
            logger.exception("diagnosis failed")
            return (f'<span class="error">⛔ The diagnosis failed ({type(err).__name__}: {html.escape(str(err))}). '
                    "The app is still running; try another image.</span>", *empty[1:])

    def on_select_term(term_maps, event: gr.SelectData):
        entry = (term_maps or {}).get(str(event.index))
        if entry is None:
            return None
        return gr.Image(value=entry[0], label=f"Map of “{entry[1]}”")

    with gr.Blocks(title="SkinCLIP-VL demo", analytics_enabled=False) as demo:
        gr.Markdown("# SkinCLIP-VL: calibrated, grounded skin-lesion diagnosis")
        gr.Markdown(BANNER, elem_id="banner")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Lesion image (dermoscopy)", type="filepath", sources=["upload"],
                                 elem_id="image_input", height=300)
                age = gr.Number(label="Age (years, optional)", value=None, minimum=0, maximum=120, elem_id="age")
                with gr.Row():
                    sex = gr.Dropdown(list(SEXES), value=UNKNOWN, label="Sex", elem_id="sex")
                    site = gr.Dropdown(site_choices(), value=UNKNOWN, label="Anatomical site", elem_id="site")
                submit = gr.Button("Diagnose", variant="primary", elem_id="submit")
                if examples:
                    gr.Examples([row[:4] for row in examples], inputs=[image, age, sex, site],
                                example_labels=[f"synthetic {row[4]}" for row in examples],
                                label="Synthetic examples (procedural images, not patients)")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload an image (or pick an example) and press **Diagnose**.",
                                     elem_id="status")
                probabilities = gr.Label(num_top_classes=len(backend.labels), elem_id="probabilities",
                                         label=f"Calibrated class probabilities ({temperature_text})")
                rationale = gr.HighlightedText(label="Rationale (grounded clinical terms highlighted; click one)",
                                               show_legend=False, show_inline_category=False, elem_id="rationale")
                with gr.Row():
                    term_map = gr.Image(label="Map of the selected term", interactive=False, elem_id="term_map",
                                        height=240, scale=1)
                    with gr.Column(scale=1):
                        warnings = gr.Markdown(elem_id="warnings")
                        json_file = gr.File(label="JSON record (as predict.py writes it)", elem_id="json_file")
        gallery = gr.Gallery(label="Overlays (drawing.py): focal-pooling map, Grad-CAM and every grounded term",
                             columns=5, fit_columns=False, height="auto", object_fit="contain", elem_id="overlays")
        term_maps = gr.State({})

        # preprocess=False: the handler gets the upload's raw payload and opens it with the repository's loader, so
        # a file that is not an image gets this app's message instead of an exception inside Gradio
        submit.click(on_submit, inputs=[image, age, sex, site],
                     outputs=[status, probabilities, rationale, term_maps, gallery, warnings, json_file, term_map],
                     preprocess=False, concurrency_limit=1)
        rationale.select(on_select_term, inputs=[term_maps], outputs=[term_map])
    return demo


def launch_demo(demo, host: str, port: int, allowed_paths, prevent_thread_lock: bool = False):
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web-font download
    return demo.launch(server_name=host, server_port=port, theme=theme, css=CSS, max_file_size=MAX_FILE_SIZE,
                       allowed_paths=[str(p) for p in allowed_paths], show_error=False, ssr_mode=False,
                       prevent_thread_lock=prevent_thread_lock, quiet=False)


def serve(argv=None, block: bool = True):
    """Parse `argv`, load the model, generate the examples and launch the page; return the launched `gr.Blocks`.

    With `block=False` the server runs in a background thread (tests, screenshots); close it with `demo.close()`.
    Raises `SystemExit` with a message when the default model has not been trained yet.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = parse_args(argv)
    if args.model == DEFAULT_MODEL and not Path(DEFAULT_MODEL).is_dir():
        raise SystemExit(f"No model at {DEFAULT_MODEL}: run `make demo` first (it trains the demo model there, a few "
                         "minutes on a CPU), or pass --model DIR_OR_HUB_ID.")
    from predict import load_model

    try:
        examples = write_examples(args.examples_dir)
    except OSError as err:  # e.g. a read-only folder: the page works without examples
        logger.warning(f"no examples: cannot generate them in {args.examples_dir} ({err})")
        examples = []
    model, processor = load_model(args.model, args.device, args.revision)
    work_dir = Path(tempfile.mkdtemp(prefix="skinclip_vl_app_"))
    atexit.register(shutil.rmtree, work_dir, True)
    backend = DemoBackend(model, processor, args.model, work_dir, max_new_tokens=args.max_new_tokens)
    demo = build_demo(backend, examples)
    launch_demo(demo, args.host, args.port, allowed_paths=[work_dir, Path(args.examples_dir).resolve()],
                prevent_thread_lock=not block)
    return demo


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    serve(argv)
    return 0


__all__ = ["DemoBackend", "InputError", "build_demo", "build_metadata", "launch_demo", "read_upload", "serve",
           "write_examples"]


if __name__ == "__main__":
    sys.exit(main())
