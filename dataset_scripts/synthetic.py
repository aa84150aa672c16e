"""Procedural, dermoscopy-like synthetic lesions: the embedded default for the demo, the tests and the CPU benchmarks.

This is NOT clinical data. It exists so that the whole pipeline (loaders, training, calibration, grounding) can run and
be measured without the real benchmarks, which cannot be downloaded here.

What is drawn (`generate`):

- The 8 ISIC 2019 classes in ISIC 2019's long-tailed mix (`CLASS_MIX`: NV 51%, MEL 18%, BCC 13%, BKL 10%, AK 3.4%,
  SCC 2.5%, VASC 1%, DF 0.9%; at least `min_per_class` images per class).
- Per class, dermoscopic criteria drawn with class-dependent probabilities (`CRITERION_PROBABILITIES`) at known places
  (streaks at the rim, blue-whitish veil at the centre, dots/globules in an off-centre cluster, network in a patch,
  vessels, regression, ...), names in `CRITERIA`. Class colour, size and shape cues are strong enough to survive a
  downsampling to 64 x 64 px, and overlap between look-alike classes (`CONFUSABLE`: about `overlap` of the lesions
  borrow the colour of a look-alike class), so results are neither trivial nor chance.
- Confounders: skin tone (class-independent), hair (class-independent), dermoscope vignetting and rulers (more frequent
  in some classes, as acquisition artefacts are in the real data: a spurious cue a robust model should not need).
- Metadata (age, sex, site) correlated with class (older patients for BCC/AK/SCC, head/neck sites for
  keratinocytic lesions, ...), with some fields left empty, as in ISIC 2019.
- Lesion groups: some lesions have 2-3 images (rotated / flipped views with new artefacts), sharing a `lesion_id`;
  a few single-image lesions have no `lesion_id`, and a few ids end in `_downsampled`, as in ISIC 2019.

Files written under `output_dir`::

    generation.json                              parameters, class counts, CRITERIA (the generator's record)
    isic2019/ISIC_2019_Training_Input/<id>.jpg   + <id>_mask_<slug>.png per criterion drawn (binary, 0/255)
    isic2019/ISIC_2019_Training_GroundTruth.csv  one-hot with UNK, CRLF (as the real file)
    isic2019/ISIC_2019_Training_Metadata.csv     image, age_approx, anatom_site_general, lesion_id, sex (CRLF)
    isic2019/synthetic_criteria.csv              image, criteria (";"-joined, `CRITERIA` order)
    derm7pt/meta/meta.csv                        the 19 real columns (the seven criteria from the drawn ones)
    derm7pt/meta/{train,valid,test}_indexes.csv  case-level split (0.4 / 0.2 / 0.4, stratified)
    derm7pt/images/SYN/<id>_d.jpg|.JPG, <id>_c.jpg   dermoscopic (+ its masks) and a blurred "clinical" view

Mask naming: `<image stem>_mask_<slug>.png` with `slug = criterion.replace(" ", "_")`, e.g.
`SYN_0000042_mask_blue-whitish_veil.png`; `criterion_masks(image_path)` and `mask_paths(image_path)` read them back.
Masks for "asymmetry" cover the lesion, for "irregular border" a band around the border, for "color variegation" the
off-colour regions; the others cover the drawn structures (dilated by a few pixels) or their region.

Held-out splits for measuring rare classes (`load(test_per_class=..., validation_per_class=...)`): every class gets
`test_per_class + validation_per_class` images on top of the long-tailed mix (`generate(held_out_per_class=...)`,
recorded in `generation.json`, so a later `load` of the folder splits it the same way), and the split puts whole lesion groups of each class into test
(then validation) until each holds at least that many images; the rest is train, which so keeps the long-tailed mix.
Balanced accuracy and macro AUROC are prevalence-free, so a test split that over-represents the rare classes measures
them without changing what they estimate. The split is seeded by `split_seed`, independently of the generation seed.

Acquisition shift (`shift=True`, the out-of-distribution set standing in for ISIC 2024's 3D-TBP tiles; see `SHIFT`):
the same diseases drawn the same way (criteria, colours, shapes, metadata), imaged differently: a tile-like crop at a
random offset, lower resolution (downsampled, blurred, saved smaller, stronger JPEG compression), a colour cast and an
illumination gradient, a darker skin-tone mix, no dermoscope vignetting and no rulers, and a low-prevalence binary
target (`SHIFT["class_mix"]`: 10% MEL/BCC/SCC, the `malignant` column). Masks get the same crop and resize. A model
is never trained on it; it is scored with the ISIC 2024 binary protocol of `evaluate_model.py`.

`load` generates (if missing) and reads the ISIC 2019 layout through `isic2019.load`, adding `criteria`; its `report`
names exactly the criteria drawn, then the diagnosis ("Dermoscopic findings: asymmetry, irregular border and
blue-whitish veil. Diagnosis: melanoma."). `align_text` is the class description sentence ("A dermoscopic image of
melanoma."), as for the other label-template sources, so that alignment targets mean the same across sources.
"""

import csv
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from datasets import DatasetDict
from PIL import Image, ImageDraw, ImageFilter

from .schema import CLASS_NAMES, criteria_report

GENERATOR_VERSION = 1

CLASS_MIX = {
    "NV": 0.51,
    "MEL": 0.18,
    "BCC": 0.13,
    "BKL": 0.10,
    "AK": 0.034,
    "SCC": 0.025,
    "VASC": 0.01,
    "DF": 0.009,
}

CRITERIA = [
    "asymmetry",
    "irregular border",
    "color variegation",
    "atypical pigment network",
    "typical pigment network",
    "irregular streaks",
    "blue-whitish veil",
    "irregular dots and globules",
    "regression structures",
    "arborizing vessels",
    "dotted vessels",
    "blue-gray ovoid nests",
    "milia-like cysts",
    "red lagoons",
    "central white patch",
    "surface scale",
]

# probability that a lesion of a class shows a criterion (absent keys: 0)
CRITERION_PROBABILITIES = {
    "MEL": {
        "asymmetry": 0.85, "irregular border": 0.8, "color variegation": 0.8, "atypical pigment network": 0.6,
        "irregular streaks": 0.45, "blue-whitish veil": 0.5, "irregular dots and globules": 0.6,
        "regression structures": 0.4, "dotted vessels": 0.05, "typical pigment network": 0.05,
    },
    "NV": {
        "asymmetry": 0.12, "irregular border": 0.1, "color variegation": 0.1, "typical pigment network": 0.75,
        "atypical pigment network": 0.08, "irregular dots and globules": 0.08, "irregular streaks": 0.04,
        "blue-whitish veil": 0.03, "regression structures": 0.04,
    },
    "BCC": {
        "arborizing vessels": 0.85, "blue-gray ovoid nests": 0.6, "asymmetry": 0.4, "irregular border": 0.3,
        "blue-whitish veil": 0.08, "regression structures": 0.12, "surface scale": 0.05,
    },
    "AK": {
        "surface scale": 0.8, "dotted vessels": 0.4, "asymmetry": 0.2, "irregular border": 0.3,
        "color variegation": 0.1,
    },
    "BKL": {
        "milia-like cysts": 0.6, "asymmetry": 0.35, "irregular border": 0.45, "color variegation": 0.2,
        "regression structures": 0.12, "typical pigment network": 0.1, "irregular dots and globules": 0.08,
    },
    "DF": {"central white patch": 0.85, "typical pigment network": 0.6, "dotted vessels": 0.1, "asymmetry": 0.1},
    "VASC": {"red lagoons": 0.95, "asymmetry": 0.2, "irregular border": 0.1},
    "SCC": {
        "surface scale": 0.7, "dotted vessels": 0.65, "asymmetry": 0.4, "irregular border": 0.35,
        "arborizing vessels": 0.05, "regression structures": 0.05,
    },
}

# base lesion colour (RGB), radius range (fraction of the image side), opacity
CLASS_LOOK = {
    "MEL": ((78, 48, 36), (0.26, 0.40), 0.92),
    "NV": ((138, 92, 62), (0.17, 0.30), 0.88),
    "BCC": ((206, 150, 146), (0.20, 0.33), 0.65),
    "AK": ((196, 112, 102), (0.18, 0.30), 0.7),
    "BKL": ((160, 116, 76), (0.22, 0.37), 0.85),
    "DF": ((170, 122, 94), (0.14, 0.23), 0.8),
    "VASC": ((150, 36, 62), (0.14, 0.25), 0.9),
    "SCC": ((214, 160, 146), (0.20, 0.33), 0.7),
}
# look-alike classes whose base colour a lesion may borrow (realistic overlap)
CONFUSABLE = {
    "MEL": ("NV", "BKL"), "NV": ("MEL", "BKL"), "BCC": ("SCC", "AK"), "AK": ("SCC", "BCC"),
    "BKL": ("NV", "MEL"), "DF": ("NV", "BKL"), "VASC": ("AK", "MEL"), "SCC": ("AK", "BCC"),
}

SKIN_TONES = [(236, 204, 184), (226, 184, 152), (204, 158, 122), (172, 124, 88), (132, 92, 62), (96, 66, 46)]
SKIN_TONE_WEIGHTS = [0.25, 0.3, 0.22, 0.12, 0.07, 0.04]

RULER_PROBABILITY = {"MEL": 0.3, "BCC": 0.2, "SCC": 0.15}  # others 0.06
VIGNETTE_PROBABILITY = {"BCC": 0.5, "AK": 0.5, "SCC": 0.5, "BKL": 0.35}  # others 0.2
HAIR_PROBABILITY = 0.3

# The acquisition shift of the out-of-distribution set (`generate(shift=True)`): what changes is how a lesion is imaged
# and who is imaged, never how a disease looks. Ranges are drawn per image.
SHIFT = {
    # low malignant prevalence (10%: MEL + BCC + SCC), as in a screening population
    "class_mix": {"NV": 0.62, "BKL": 0.2, "AK": 0.04, "DF": 0.02, "VASC": 0.02, "MEL": 0.04, "BCC": 0.045, "SCC": 0.015},
    "skin_tone_weights": [0.1, 0.15, 0.25, 0.22, 0.16, 0.12],  # darker than SKIN_TONE_WEIGHTS
    "vignette_probability": 0.0,  # no dermoscope
    "ruler_probability": 0.0,
    "crop": (0.72, 0.9),  # tile side as a share of the rendered side, at a random offset
    "detail": (0.3, 0.45),  # downsampled to this share of the tile side (detail lost), then back up
    "output_scale": 0.6,  # saved at this share of `image_size` (ISIC 2024 tiles are ~137 px)
    "colour_cast": 0.12,  # per-channel gain in [1 - c, 1 + c], one draw per image
    "illumination": 0.25,  # linear brightness ramp of this depth in a random direction
    "jpeg_quality": 70,
}

# age mean / sd, probability male, site weights (ISIC 2019 anatom_site_general values)
SITES = ["anterior torso", "posterior torso", "lower extremity", "upper extremity", "head/neck", "palms/soles",
         "oral/genital", "lateral torso"]
CLASS_METADATA = {
    "MEL": (60, 15, 0.55, [0.18, 0.3, 0.2, 0.14, 0.12, 0.03, 0.01, 0.02]),
    "NV": (40, 14, 0.48, [0.3, 0.35, 0.15, 0.1, 0.04, 0.02, 0.01, 0.03]),
    "BCC": (68, 12, 0.58, [0.12, 0.15, 0.08, 0.07, 0.55, 0.0, 0.01, 0.02]),
    "AK": (70, 10, 0.62, [0.04, 0.04, 0.1, 0.2, 0.62, 0.0, 0.0, 0.0]),
    "BKL": (62, 14, 0.52, [0.25, 0.25, 0.12, 0.12, 0.22, 0.01, 0.0, 0.03]),
    "DF": (45, 14, 0.35, [0.06, 0.06, 0.7, 0.15, 0.01, 0.0, 0.0, 0.02]),
    "VASC": (45, 20, 0.5, [0.25, 0.2, 0.2, 0.1, 0.2, 0.01, 0.02, 0.02]),
    "SCC": (72, 10, 0.6, [0.06, 0.05, 0.2, 0.25, 0.44, 0.0, 0.0, 0.0]),
}
DERM7PT_DIAGNOSES = {
    "MEL": ["melanoma (less than 0.76 mm)", "melanoma (in situ)", "melanoma (0.76 to 1.5 mm)"],
    "NV": ["clark nevus", "clark nevus", "reed or spitz nevus", "dermal nevus", "blue nevus"],
    "BCC": ["basal cell carcinoma"],
    "BKL": ["seborrheic keratosis", "lentigo"],
    "DF": ["dermatofibroma"],
    "VASC": ["vascular lesion"],
    "AK": ["miscellaneous"],  # Derm7pt has no AK / SCC: these cases are excluded by its loader, as in the real data
    "SCC": ["miscellaneous"],
}
DERM7PT_SITES = {
    "anterior torso": "abdomen", "posterior torso": "back", "lateral torso": "chest", "lower extremity": "lower limbs",
    "upper extremity": "upper limbs", "head/neck": "head neck", "palms/soles": "acral", "oral/genital": "genital areas",
}
DERM7PT_SPLIT_FRACTIONS = (0.4, 0.2, 0.4)


def slug(criterion: str) -> str:
    """File-name form of a criterion: spaces -> underscores ("blue-whitish veil" -> "blue-whitish_veil")."""
    return criterion.replace(" ", "_")


def mask_paths(image_path) -> dict:
    """`{criterion: Path}` of the mask PNGs saved beside `image_path` (`<stem>_mask_<slug>.png`), in `CRITERIA` order."""
    image_path = Path(image_path)
    out = {}
    for criterion in CRITERIA:
        p = image_path.with_name(f"{image_path.stem}_mask_{slug(criterion)}.png")
        if p.is_file():
            out[criterion] = p
    return out


def criterion_masks(image_path, as_array: bool = True) -> dict:
    """`{criterion: mask}` for the image at `image_path`: boolean `np.ndarray` (H x W), or PIL "L" images."""
    out = {}
    for criterion, p in mask_paths(image_path).items():
        with Image.open(p) as im:
            im = im.convert("L")
            out[criterion] = np.asarray(im) > 127 if as_array else im.copy()
    return out


# ---------------------------------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------------------------------


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1] of shape (size, size), `cells` control points per side."""
    small = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
    return np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.float32).clip(0, 1)


def class_counts(num_images: int, min_per_class: int, mix: dict | None = None) -> dict:
    """Images per class for `num_images`: the long-tailed `CLASS_MIX` shares (or `mix`'s; largest remainders first),
    at least `min_per_class` each."""
    mix = CLASS_MIX if mix is None else mix
    raw = {c: num_images * p for c, p in mix.items()}
    counts = {c: max(min_per_class, int(np.floor(v))) for c, v in raw.items()}
    rest = num_images - sum(counts.values())
    order = sorted(mix, key=lambda c: (-(raw[c] - np.floor(raw[c])), CLASS_NAMES.index(c)))
    i = 0
    while rest > 0:
        counts[order[i % len(order)]] += 1
        rest -= 1
        i += 1
    while rest < 0:  # min_per_class overshoot: take from the largest class
        big = max(counts, key=counts.get)
        counts[big] -= 1
        rest += 1
    return counts


class _Canvas:
    """One lesion's pixels and criterion masks at a given size."""

    def __init__(self, size: int):
        self.size = size
        self.img = np.zeros((size, size, 3), np.float32)
        self.masks = {}

    def add_mask(self, criterion: str, mask: np.ndarray) -> None:
        prev = self.masks.get(criterion)
        self.masks[criterion] = mask if prev is None else (prev | mask)

    def blend(self, where: np.ndarray, color, alpha: float | np.ndarray = 1.0) -> None:
        a = (where.astype(np.float32) * alpha)[..., None]
        self.img = self.img * (1 - a) + np.asarray(color, np.float32) * a


def _draw_layer(size: int, draw_fn) -> np.ndarray:
    layer = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(layer))
    return np.asarray(layer) > 0


def _render_lesion(cls: str, criteria: list, rng, size: int, overlap: float, tone_weights=None) -> _Canvas:
    s = size
    cv = _Canvas(s)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    # skin
    tone_weights = SKIN_TONE_WEIGHTS if tone_weights is None else tone_weights
    tone = np.asarray(SKIN_TONES[rng.choice(len(SKIN_TONES), p=tone_weights)], np.float32)
    tone = tone * rng.uniform(0.93, 1.05) + rng.normal(0, 4, 3)
    cv.img[:] = tone + (_smooth_noise(rng, s, 5)[..., None] - 0.5) * 18 + rng.normal(0, 3, (s, s, 1))
    # lesion shape
    base, (rmin, rmax), opacity = CLASS_LOOK[cls]
    look_cls = cls
    if rng.random() < overlap:
        look_cls = CONFUSABLE[cls][rng.integers(2)]
        base = CLASS_LOOK[look_cls][0]
    radius = rng.uniform(rmin, rmax) * s
    cx, cy = s / 2 + rng.uniform(-0.07, 0.07) * s, s / 2 + rng.uniform(-0.07, 0.07) * s
    dx, dy = xx - cx, yy - cy
    dist = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    asym = "asymmetry" in criteria
    irregular = "irregular border" in criteria
    shape = 1.0 + (rng.uniform(0.18, 0.3) if asym else rng.uniform(0.0, 0.04)) * np.cos(theta - rng.uniform(0, 6.3))
    shape += (rng.uniform(0.15, 0.28) if asym else rng.uniform(0.02, 0.08)) * np.cos(2 * (theta - rng.uniform(0, 6.3)))
    for k in range(5, 13) if irregular else range(3, 5):
        amp = rng.uniform(0.03, 0.07) if irregular else rng.uniform(0.0, 0.015)
        shape += amp * np.cos(k * theta + rng.uniform(0, 6.3))
    rtheta = radius * shape
    over = rtheta.max() / (0.46 * s - max(abs(cx - s / 2), abs(cy - s / 2)))
    if over > 1:
        rtheta = rtheta / over
    rho = dist / rtheta  # 0 at the centre, 1 on the border
    lesion = rho < 1.0
    edge = 1.5 if not irregular else 1.0
    alpha = np.clip((rtheta - dist) / (edge * s / 112) + 0.5, 0, 1)
    # lesion colour: base, central darkening, texture
    col = np.asarray(base, np.float32) * rng.uniform(0.88, 1.1)
    shade = 1.0 - 0.18 * (1 - np.clip(rho, 0, 1))[..., None] * (1 if look_cls in ("MEL", "NV", "BKL") else 0.3)
    texture = 1.0 + (_smooth_noise(rng, s, 9)[..., None] - 0.5) * 0.25
    lesion_rgb = col * shade * texture
    cv.img = cv.img * (1 - alpha[..., None] * opacity) + lesion_rgb * alpha[..., None] * opacity

    def patch(keep):  # a contiguous patch of the lesion
        n = _smooth_noise(rng, s, 4)
        inside = n[lesion]
        thr = np.quantile(inside, 1 - keep) if inside.size else 1.0
        return lesion & (n >= thr)

    if "color variegation" in criteria:
        var = np.zeros((s, s), bool)
        colors = [(35, 24, 22), (112, 70, 45), (186, 146, 110), (96, 102, 130)]
        for j in rng.choice(len(colors), size=2, replace=False):
            p = patch(rng.uniform(0.2, 0.35))
            cv.blend(p, colors[j], 0.75)
            var |= p
        cv.add_mask("color variegation", var)
    for kind in ("typical pigment network", "atypical pigment network"):
        if kind not in criteria:
            continue
        atyp = kind.startswith("atypical")
        ang = rng.uniform(0, np.pi)
        u = xx * np.cos(ang) + yy * np.sin(ang)
        v = -xx * np.sin(ang) + yy * np.cos(ang)
        warp = (_smooth_noise(rng, s, 6) - 0.5) * (14 if atyp else 3) * s / 224
        period = (rng.uniform(7, 11) if atyp else rng.uniform(5, 7)) * s / 224
        lines = np.maximum(np.cos(2 * np.pi * (u + warp) / period), np.cos(2 * np.pi * (v - warp) / period))
        width = 0.55 if atyp else 0.8
        net = lines > width
        where = patch(rng.uniform(0.4, 0.6)) if atyp else (lesion & (rho < 0.9))
        cv.blend(net & where, (40, 26, 20) if atyp else (92, 60, 40), 0.8 if atyp else 0.55)
        cv.add_mask(kind, where)
    if "regression structures" in criteria:
        reg = patch(rng.uniform(0.15, 0.3)) & (rho < 0.85)
        cv.blend(reg, (226, 216, 212), 0.75)
        pepper = reg & (rng.random((s, s)) < 0.06)
        cv.blend(pepper, (88, 94, 116), 0.9)
        cv.add_mask("regression structures", reg)
    if "blue-whitish veil" in criteria:
        vr = rng.uniform(0.35, 0.55)
        blob = (rho < vr * (1 + 0.25 * (_smooth_noise(rng, s, 5) - 0.5))) & lesion
        cv.blend(blob, (112, 134, 172), 0.72)
        cv.add_mask("blue-whitish veil", blob)
    if "central white patch" in criteria:
        wp = (rho < rng.uniform(0.3, 0.45) * (1 + 0.3 * (_smooth_noise(rng, s, 4) - 0.5))) & lesion
        cv.blend(wp, (238, 230, 222), 0.85)
        cv.add_mask("central white patch", wp)
    if "red lagoons" in criteria:
        lag = np.zeros((s, s), bool)
        rim = np.zeros((s, s), bool)
        for _ in range(rng.integers(5, 10)):
            a, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.65)
            px, py = cx + np.cos(a) * rr * radius, cy + np.sin(a) * rr * radius
            r0 = rng.uniform(0.16, 0.3) * radius
            d = np.hypot(xx - px, yy - py)
            lag |= (d < r0) & lesion
            rim |= (d < r0 * 1.15) & lesion
        cv.blend(rim, (70, 10, 30), 0.8)
        cv.blend(lag, (176, 28, 60), 0.85)
        cv.add_mask("red lagoons", rim)
    if "surface scale" in criteria:
        sc = patch(rng.uniform(0.3, 0.5)) & (rng.random((s, s)) < 0.55)
        sc_blur = np.asarray(Image.fromarray((sc * 255).astype(np.uint8)).filter(ImageFilter.BoxBlur(1))) > 60
        cv.blend(sc_blur & lesion, (240, 232, 200), 0.7)
        cv.add_mask("surface scale", patch_mask_fill(sc_blur & lesion))
    # structures drawn with PIL, each with its (dilated) mask
    scale = s / 224

    def dots(n, rlo, rhi, color, centre_jitter, spread, crit, dil=2.0):
        ang0 = rng.uniform(0, 2 * np.pi)
        ccx = cx + np.cos(ang0) * centre_jitter * radius
        ccy = cy + np.sin(ang0) * centre_jitter * radius
        pts = []
        for _ in range(n):
            a, rr = rng.uniform(0, 2 * np.pi), spread * radius * np.sqrt(rng.random())
            px, py = ccx + np.cos(a) * rr, ccy + np.sin(a) * rr
            if rho[int(np.clip(py, 0, s - 1)), int(np.clip(px, 0, s - 1))] < 0.95:
                pts.append((px, py, rng.uniform(rlo, rhi) * scale))
        if not pts:
            return
        shape_mask = _draw_layer(s, lambda d: [d.ellipse([x - r, y - r, x + r, y + r], fill=255) for x, y, r in pts])
        dil_mask = _draw_layer(
            s, lambda d: [d.ellipse([x - r - dil * scale, y - r - dil * scale, x + r + dil * scale, y + r + dil * scale],
                                    fill=255) for x, y, r in pts])
        cv.blend(shape_mask, color, 0.92)
        cv.add_mask(crit, dil_mask)

    if "irregular dots and globules" in criteria:
        dots(rng.integers(12, 30), 1.5, 4.5, (28, 18, 16), 0.4, 0.5, "irregular dots and globules")
    if "blue-gray ovoid nests" in criteria:
        dots(rng.integers(3, 7), 4.0, 8.0, (84, 96, 122), 0.2, 0.6, "blue-gray ovoid nests")
    if "milia-like cysts" in criteria:
        dots(rng.integers(4, 12), 1.8, 3.5, (246, 240, 214), 0.0, 0.8, "milia-like cysts")
    if "dotted vessels" in criteria:
        dots(rng.integers(25, 50), 1.0, 1.8, (186, 36, 46), 0.0, 0.9, "dotted vessels", dil=2.5)
    if "irregular streaks" in criteria:
        segs = []
        for _ in range(rng.integers(1, 3)):
            a0, width = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.3)
            for _ in range(rng.integers(5, 11)):
                a = a0 + rng.uniform(0, width)
                ix, iy = int(np.clip(cx + np.cos(a) * radius, 0, s - 1)), int(np.clip(cy + np.sin(a) * radius, 0, s - 1))
                rb = rtheta[iy, ix]
                r1, r2 = rb * rng.uniform(0.78, 0.9), rb * rng.uniform(1.08, 1.22)
                segs.append((cx + np.cos(a) * r1, cy + np.sin(a) * r1, cx + np.cos(a) * r2, cy + np.sin(a) * r2))
        w = max(1, round(2 * scale))
        line = _draw_layer(s, lambda d: [d.line(sg, fill=255, width=w) for sg in segs])
        wide = _draw_layer(s, lambda d: [d.line(sg, fill=255, width=w + max(2, round(5 * scale))) for sg in segs])
        cv.blend(line, (36, 22, 18), 0.9)
        cv.add_mask("irregular streaks", wide)
    if "arborizing vessels" in criteria:
        segs = []

        def branch(x, y, a, length, width, depth):
            if depth == 0 or length < 3 * scale:
                return
            x2, y2 = x + np.cos(a) * length, y + np.sin(a) * length
            segs.append(((x, y, x2, y2), max(1, round(width))))
            for turn in (-1, 1):
                branch(x2, y2, a + turn * rng.uniform(0.3, 0.8), length * rng.uniform(0.55, 0.75), width * 0.7,
                       depth - 1)

        for _ in range(rng.integers(2, 4)):
            a = rng.uniform(0, 2 * np.pi)
            sx, sy = cx + np.cos(a) * radius * 0.55, cy + np.sin(a) * radius * 0.55
            branch(sx, sy, a + np.pi + rng.uniform(-0.5, 0.5), radius * 0.45, 3 * scale, 4)
        line = _draw_layer(s, lambda d: [d.line(sg, fill=255, width=wd) for sg, wd in segs])
        wide = _draw_layer(s, lambda d: [d.line(sg, fill=255, width=wd + max(2, round(5 * scale))) for sg, wd in segs])
        cv.blend(line & (rho < 1.05), (196, 26, 38), 0.9)
        cv.add_mask("arborizing vessels", wide & (rho < 1.1))
    if asym:
        cv.add_mask("asymmetry", lesion)
    if irregular:
        cv.add_mask("irregular border", np.abs(rho - 1) < 0.14)
    return cv


def patch_mask_fill(mask: np.ndarray) -> np.ndarray:
    """Close small holes of a speckled mask (so that a scale region is one region, not its speckles)."""
    im = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.MinFilter(3))
    return np.asarray(im) > 127


def _add_artefacts(img: np.ndarray, cls: str, rng, size: int, shift: bool = False) -> tuple[np.ndarray, dict]:
    s = size
    flags = {}
    vignette_p = SHIFT["vignette_probability"] if shift else VIGNETTE_PROBABILITY.get(cls, 0.2)
    ruler_p = SHIFT["ruler_probability"] if shift else RULER_PROBABILITY.get(cls, 0.06)
    if rng.random() < vignette_p:
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        d = np.hypot(xx - s / 2, yy - s / 2) / (s / 2)
        fall = np.clip((d - rng.uniform(0.85, 1.0)) / 0.25, 0, 1)[..., None]
        img = img * (1 - 0.92 * fall)
        flags["vignette"] = True
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    if rng.random() < HAIR_PROBABILITY:
        for _ in range(rng.integers(2, 9)):
            x, y = rng.uniform(0, s, 2)
            a = rng.uniform(0, 2 * np.pi)
            pts = [(x, y)]
            for _ in range(6):
                a += rng.uniform(-0.35, 0.35)
                x, y = x + np.cos(a) * s / 9, y + np.sin(a) * s / 9
                pts.append((x, y))
            shade = int(rng.uniform(15, 60))
            draw.line(pts, fill=(shade, shade - 5 if shade > 5 else 0, 0), width=max(1, round(s / 180)))
        flags["hair"] = True
    if rng.random() < ruler_p:
        side = rng.integers(4)
        t = s * 0.07
        light = tuple(int(v) for v in rng.uniform(200, 240, 3))
        box = [(0, 0, s, t), (0, s - t, s, s), (0, 0, t, s), (s - t, 0, s, s)][side]
        draw.rectangle(box, fill=light)
        for k in range(0, s, max(3, s // 28)):
            length = t * (0.8 if (k // max(3, s // 28)) % 5 == 0 else 0.45)
            if side == 0:
                draw.line([(k, 0), (k, length)], fill=(20, 20, 20), width=1)
            elif side == 1:
                draw.line([(k, s - 1), (k, s - 1 - length)], fill=(20, 20, 20), width=1)
            elif side == 2:
                draw.line([(0, k), (length, k)], fill=(20, 20, 20), width=1)
            else:
                draw.line([(s - 1, k), (s - 1 - length, k)], fill=(20, 20, 20), width=1)
        flags["ruler"] = True
    return np.asarray(pil, np.float32), flags


def _shift_acquisition(img: np.ndarray, masks: dict, rng, size: int) -> tuple[Image.Image, dict]:
    """The `SHIFT` imaging of one view: tile-like crop, lost detail, colour cast, illumination ramp, smaller output."""
    side = int(round(size * rng.uniform(*SHIFT["crop"])))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    out = max(32, int(round(size * SHIFT["output_scale"])))
    tile = img[y0 : y0 + side, x0 : x0 + side].astype(np.float32)
    gain = 1.0 + rng.uniform(-SHIFT["colour_cast"], SHIFT["colour_cast"], 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / max(side - 1, 1) - 0.5
    ramp = 1.0 + SHIFT["illumination"] * (xx * np.cos(angle) + yy * np.sin(angle))
    tile = tile * gain[None, None, :] * ramp[..., None]
    low = max(16, int(round(side * rng.uniform(*SHIFT["detail"]))))
    pil = Image.fromarray(tile.clip(0, 255).astype(np.uint8)).resize((low, low), Image.BILINEAR)
    pil = pil.resize((out, out), Image.BICUBIC)
    shifted_masks = {}
    for criterion, mask in masks.items():
        m = Image.fromarray((mask[y0 : y0 + side, x0 : x0 + side] * 255).astype(np.uint8), mode="L")
        shifted_masks[criterion] = np.asarray(m.resize((out, out), Image.NEAREST)) > 127
    return pil, shifted_masks


def _metadata(cls: str, rng) -> dict:
    mean, sd, p_male, site_w = CLASS_METADATA[cls]
    age = int(np.clip(5 * round(rng.normal(mean, sd) / 5), 5, 85))
    sex = "male" if rng.random() < p_male else "female"
    w = np.asarray(site_w, np.float64)
    site = SITES[rng.choice(len(SITES), p=w / w.sum())]
    return {
        "age_approx": "" if rng.random() < 0.03 else str(age),
        "sex": "" if rng.random() < 0.02 else sex,
        "anatom_site_general": "" if rng.random() < 0.05 else site,
    }


def _seven_point(criteria: list) -> dict:
    c = set(criteria)
    values = {
        "pigment_network": "atypical" if "atypical pigment network" in c
        else ("typical" if "typical pigment network" in c else "absent"),
        "streaks": "irregular" if "irregular streaks" in c else "absent",
        "pigmentation": "diffuse irregular" if "color variegation" in c else "absent",
        "regression_structures": "combinations" if "regression structures" in c else "absent",
        "dots_and_globules": "irregular" if "irregular dots and globules" in c else "absent",
        "blue_whitish_veil": "present" if "blue-whitish veil" in c else "absent",
        "vascular_structures": "arborizing" if "arborizing vessels" in c
        else ("dotted" if "dotted vessels" in c else "absent"),
    }
    score = 2 * (values["pigment_network"] == "atypical") + 2 * (values["blue_whitish_veil"] == "present")
    score += 2 * (values["vascular_structures"] == "dotted")
    score += sum(values[k] != "absent" for k in ("streaks", "pigmentation", "regression_structures"))
    score += values["dots_and_globules"] == "irregular"
    values["seven_point_score"] = str(score)
    return values


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(path, optimize=False, compress_level=1)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_csv(path: Path, header: list, rows: list, crlf: bool) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\r\n" if crlf else "\n")
        w.writerow(header)
        w.writerows(rows)


def generate(
    output_dir,
    num_images: int = 1000,
    seed: int = 0,
    image_size: int = 224,
    min_per_class: int = 2,
    overlap: float = 0.12,
    write_derm7pt: bool = True,
    jpeg_quality: int = 90,
    held_out_per_class: dict | None = None,
    shift: bool = False,
) -> dict:
    """Write a synthetic dataset in the ISIC 2019 and Derm7pt layouts (see the module docstring). Deterministic per seed.

    Args:
        output_dir: folder to create; must not exist or be empty. Written through a temporary sibling folder and
            renamed at the end, so an interrupted run leaves nothing behind.
        num_images (`int`, *optional*, defaults to 1000): images in the ISIC 2019 layout.
        seed (`int`, *optional*, defaults to 0): the only source of randomness.
        image_size (`int`, *optional*, defaults to 224): side of the square images and masks.
        min_per_class (`int`, *optional*, defaults to 2): floor of images per class (the tail classes are tiny).
        overlap (`float`, *optional*, defaults to 0.12): share of lesions drawn in a look-alike class's colour.
        write_derm7pt (`bool`, *optional*, defaults to `True`): also write the Derm7pt layout.
        jpeg_quality (`int`, *optional*, defaults to 90).
        held_out_per_class (`dict`, *optional*): `{"test": t, "validation": v}`: `t + v` images are added to every
            class on top of the long-tailed mix, for the class-balanced held-out splits of `load` (recorded).
        shift (`bool`, *optional*, defaults to `False`): draw the out-of-distribution set: the acquisition shift of
            `SHIFT` (its class mix, skin tones, no vignetting or rulers, tile crop, lower resolution, colour cast,
            illumination); no Derm7pt layout is written.

    Returns:
        `dict`: the record written to `generation.json` (parameters, class counts, criteria counts, artefact counts).
    """
    if num_images < len(CLASS_NAMES) * min_per_class:
        raise ValueError(f"num_images={num_images} is below 8 classes x min_per_class={min_per_class}")
    held_out_per_class = {k: int(v) for k, v in (held_out_per_class or {}).items() if v}
    if set(held_out_per_class) - {"test", "validation"} or any(v < 0 for v in held_out_per_class.values()):
        raise ValueError(f"held_out_per_class must map test / validation to counts >= 0, got {held_out_per_class}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        record = _generate_into(
            tmp, num_images, seed, image_size, min_per_class, overlap, write_derm7pt and not shift, jpeg_quality,
            held_out_per_class, shift,
        )
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _generate_into(root: Path, num_images, seed, image_size, min_per_class, overlap, write_derm7pt, jpeg_quality,
                   held_out_per_class=None, shift=False):
    rng = np.random.default_rng(seed)
    extra_per_class = sum((held_out_per_class or {}).values())
    counts = class_counts(num_images, min_per_class, SHIFT["class_mix"] if shift else None)
    counts = {c: n + extra_per_class for c, n in counts.items()}
    # lesions: each class's images grouped into lesions of 1-3 views
    lesions = []
    for cls in CLASS_NAMES:
        left = counts[cls]
        while left > 0:
            n = min(left, int(rng.choice([1, 2, 3], p=[0.72, 0.2, 0.08])))
            lesions.append((cls, n))
            left -= n
    order = rng.permutation(len(lesions))
    lesions = [lesions[i] for i in order]
    lesion_seeds = rng.integers(0, 2**63 - 1, size=len(lesions))

    isic = root / "isic2019"
    img_dir = isic / "ISIC_2019_Training_Input"
    img_dir.mkdir(parents=True)
    gt_rows, meta_rows, crit_rows, cases = [], [], [], []
    criteria_counts = dict.fromkeys(CRITERIA, 0)
    artefacts = {"vignette": 0, "hair": 0, "ruler": 0}
    image_idx = 0
    for li, ((cls, n_views), lseed) in enumerate(zip(lesions, lesion_seeds)):
        lrng = np.random.default_rng(int(lseed))
        probs = CRITERION_PROBABILITIES[cls]
        criteria = [c for c in CRITERIA if lrng.random() < probs.get(c, 0.0)]
        if "typical pigment network" in criteria and "atypical pigment network" in criteria:
            criteria.remove("typical pigment network")
        canvas = _render_lesion(
            cls, criteria, lrng, image_size, overlap, SHIFT["skin_tone_weights"] if shift else None
        )
        masks = {c: m for c, m in canvas.masks.items() if m.sum() >= 4}
        criteria = [c for c in criteria if c in masks]
        meta = _metadata(cls, lrng)
        lesion_id = "" if (n_views == 1 and lrng.random() < 0.08) else f"SYN_L{li:06d}"
        for c in criteria:
            criteria_counts[c] += 1
        first_id = None
        for v in range(n_views):
            vrng = np.random.default_rng([int(lseed), v + 1])
            img, view_masks = canvas.img, masks
            if v > 0:  # another view of the same lesion: rotate / flip image and masks alike
                k, flip = int(vrng.integers(1, 4)), bool(vrng.integers(2))

                def tf(a, k=k, flip=flip):
                    a = np.rot90(a, k)
                    return np.ascontiguousarray(a[:, ::-1] if flip else a)

                img, view_masks = tf(img), {c: tf(m) for c, m in masks.items()}
            img, flags = _add_artefacts(img, cls, vrng, image_size, shift=shift)
            for f in flags:
                artefacts[f] += 1
            img = img + vrng.normal(0, 2.0, img.shape)
            image_id = f"SYN_{image_idx:07d}" + ("_downsampled" if vrng.random() < 0.04 else "")
            image_idx += 1
            first_id = first_id or image_id
            if shift:
                pil, view_masks = _shift_acquisition(img, view_masks, vrng, image_size)
                pil.save(img_dir / f"{image_id}.jpg", quality=SHIFT["jpeg_quality"])
            else:
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(img_dir / f"{image_id}.jpg", quality=jpeg_quality)
            for c in criteria:
                _save_mask(view_masks[c], img_dir / f"{image_id}_mask_{slug(c)}.png")
            gt_rows.append([image_id] + [f"{float(cls == c):.1f}" for c in [*CLASS_NAMES, "UNK"]])
            meta_rows.append([image_id, meta["age_approx"], meta["anatom_site_general"], lesion_id, meta["sex"]])
            crit_rows.append([image_id, ";".join(criteria)])
        cases.append((cls, first_id, criteria, meta, lrng))
    _write_csv(isic / "ISIC_2019_Training_GroundTruth.csv", ["image", *CLASS_NAMES, "UNK"], gt_rows, crlf=True)
    _write_csv(
        isic / "ISIC_2019_Training_Metadata.csv",
        ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
        meta_rows,
        crlf=True,
    )
    _write_csv(isic / "synthetic_criteria.csv", ["image", "criteria"], crit_rows, crlf=False)
    if write_derm7pt:
        _write_derm7pt(root / "derm7pt", img_dir, cases, seed, image_size)
    record = {
        "generator": "dataset_scripts.synthetic",
        "version": GENERATOR_VERSION,
        "note": "procedural synthetic lesions for tests and demos; not clinical data",
        "num_images": num_images,
        "seed": seed,
        "image_size": image_size,
        "min_per_class": min_per_class,
        "overlap": overlap,
        "extra_per_class": extra_per_class,
        "held_out_per_class": held_out_per_class or None,
        "shift": SHIFT if shift else None,
        "num_lesions": len(lesions),
        "class_counts": counts,
        "criteria": CRITERIA,
        "criteria_counts_per_lesion": criteria_counts,
        "artefact_counts_per_image": artefacts,
        "derm7pt_cases": len(cases) if write_derm7pt else 0,
    }
    (root / "generation.json").write_text(json.dumps(record, indent=2))
    return record


def _write_derm7pt(root: Path, isic_img_dir: Path, cases: list, seed: int, size: int) -> None:
    from .splits import group_split

    (root / "meta").mkdir(parents=True)
    sub = root / "images" / "SYN"
    sub.mkdir(parents=True)
    header = [
        "case_num", "diagnosis", "seven_point_score", "pigment_network", "streaks", "pigmentation",
        "regression_structures", "dots_and_globules", "blue_whitish_veil", "vascular_structures",
        "level_of_diagnostic_difficulty", "elevation", "location", "sex", "management", "clinic", "derm", "case_id",
        "notes",
    ]
    rows, labels = [], []
    for i, (cls, image_id, criteria, meta, lrng) in enumerate(cases):
        stem = image_id.replace("SYN_", "Syn")
        derm_name = f"{stem}_d." + ("JPG" if i % 5 == 0 else "jpg")
        clinic_name = f"{stem}_c." + ("JPG" if i % 3 == 0 else "jpg")
        src = isic_img_dir / f"{image_id}.jpg"
        _link_or_copy(src, sub / derm_name)
        for c in criteria:
            _link_or_copy(isic_img_dir / f"{image_id}_mask_{slug(c)}.png", sub / f"{Path(derm_name).stem}_mask_{slug(c)}.png")
        with Image.open(src) as im:
            clinic = im.filter(ImageFilter.GaussianBlur(size / 90)).resize((size * 3 // 4, size * 3 // 4))
            clinic.save(sub / clinic_name, quality=85)
        sp = _seven_point(criteria)
        diagnosis = DERM7PT_DIAGNOSES[cls][int(lrng.integers(len(DERM7PT_DIAGNOSES[cls])))]
        elevation = {"BCC": "palpable", "SCC": "nodular", "VASC": "palpable", "DF": "palpable"}.get(cls, "flat")
        management = "excision" if cls in ("MEL", "BCC", "SCC") else "clinical follow up"
        rows.append([
            str(i + 1), diagnosis, sp["seven_point_score"], sp["pigment_network"], sp["streaks"], sp["pigmentation"],
            sp["regression_structures"], sp["dots_and_globules"], sp["blue_whitish_veil"], sp["vascular_structures"],
            ["low", "medium", "high"][int(lrng.integers(3))], elevation,
            DERM7PT_SITES.get(meta["anatom_site_general"], ""), meta["sex"], management,
            f"SYN/{clinic_name}", f"SYN/{derm_name}", "", "",
        ])
        labels.append(CLASS_NAMES.index(cls))
    _write_csv(root / "meta" / "meta.csv", header, rows, crlf=False)
    assignment = group_split(labels, [str(i) for i in range(len(rows))], DERM7PT_SPLIT_FRACTIONS, seed)
    for split, name in (("train", "train_indexes.csv"), ("validation", "valid_indexes.csv"), ("test", "test_indexes.csv")):
        idx = [[str(i)] for i, a in enumerate(assignment) if a == split]
        _write_csv(root / "meta" / name, ["indexes"], idx, crlf=False)


def default_data_dir(num_images: int, seed: int, image_size: int) -> Path:
    """Cache folder for `load(data_dir=None)`: `$SKINCLIP_VL_CACHE` or `~/.cache/skinclip_vl`, then
    `synthetic/n{num_images}_s{seed}_px{image_size}_v{GENERATOR_VERSION}`."""
    base = Path(os.environ.get("SKINCLIP_VL_CACHE", Path.home() / ".cache" / "skinclip_vl"))
    return base / "synthetic" / f"n{num_images}_s{seed}_px{image_size}_v{GENERATOR_VERSION}"


def read_generation(data_dir) -> dict:
    """The parameters of the generation in `data_dir` (its `generation.json`), or `{}` when it holds none."""
    record_path = Path(data_dir) / "generation.json"
    return json.loads(record_path.read_text()) if record_path.is_file() else {}


def ensure_generated(data_dir, num_images: int = 1000, seed: int = 0, image_size: int = 224, **kwargs) -> Path:
    """Generate into `data_dir` unless a finished generation with the same parameters is there; return `data_dir`."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(num_images, seed, image_size)
    record = read_generation(data_dir)
    if record:
        wanted = {"num_images": num_images, "seed": seed, "image_size": image_size, "version": GENERATOR_VERSION,
                  "held_out_per_class": kwargs.get("held_out_per_class") or None,
                  "shift": bool(kwargs.get("shift", False))}
        found = {k: record.get(k) for k in wanted}
        found["held_out_per_class"] = record.get("held_out_per_class") or None
        found["shift"] = bool(record.get("shift"))
        if found != wanted:
            raise ValueError(f"{data_dir} holds a synthetic generation with {found}, not the requested {wanted} "
                             "(use another folder, or delete this one to regenerate)")
        return data_dir
    generate(data_dir, num_images=num_images, seed=seed, image_size=image_size, **kwargs)
    return data_dir


def read_criteria(isic_dir) -> dict:
    """`{image_id: [criteria]}` from `synthetic_criteria.csv` of a generated ISIC 2019 layout."""
    from ._common import read_csv

    _, rows = read_csv(Path(isic_dir) / "synthetic_criteria.csv", ["image", "criteria"])
    return {r["image"]: [c for c in r["criteria"].split(";") if c] for _, r in rows}


def _quota_split(labels, groups, quotas: dict, seed: int) -> list:
    """Split names per row: per class, whole groups (shuffled with `seed`) fill each split of `quotas` in order until
    it holds at least `quotas[split]` images; the remaining groups are train."""
    members = {}  # class -> groups (one class per synthetic lesion group)
    size = Counter()
    for label, group in zip(labels, groups):
        if group not in size:
            members.setdefault(int(label), []).append(group)
        size[group] += 1
    rng = np.random.default_rng(seed)
    assignment = {}
    for label in sorted(members):
        order = sorted(members[label])
        rng.shuffle(order)
        queue = [(split, n) for split, n in quotas.items() if n > 0]
        filled = 0
        for group in order:
            while queue and filled >= queue[0][1]:
                queue.pop(0)
                filled = 0
            if not queue:
                assignment[group] = "train"
                continue
            assignment[group] = queue[0][0]
            filled += size[group]
    return [assignment[g] for g in groups]


def _apply_quota_split(dd: DatasetDict, quotas: dict, split_seed: int, train_fraction: float) -> DatasetDict:
    from .splits import check_no_group_leakage, group_subset

    full, summary = dd["train"], dd.summary
    labels, groups, image_ids = full["label"], full["group_id"], full["image_id"]
    assignment = _quota_split(labels, groups, quotas, split_seed)
    index = {name: [i for i, a in enumerate(assignment) if a == name] for name in ("train", "validation", "test")}
    for name, quota in quotas.items():
        held = Counter(labels[i] for i in index[name])
        short = [CLASS_NAMES[c] for c in sorted(set(labels)) if held[c] < quota]
        if short:
            raise ValueError(f"{summary.data_dir}: too few images to put {quota} per class in {name} for {short}")
    if train_fraction != 1.0:
        train = index["train"]
        keep = set(group_subset([labels[i] for i in train], [groups[i] for i in train], train_fraction, split_seed))
        for k, i in enumerate(train):
            if k not in keep:
                summary.note(f"left out of train by train_fraction={train_fraction} (group-level)", image_ids[i])
        summary.settings["train_fraction_dropped_rows"] = len(train) - len(keep)
        index["train"] = [i for k, i in enumerate(train) if k in keep]
    out = DatasetDict({name: full.select(rows) for name, rows in index.items()})
    check_no_group_leakage(out)
    summary.count_rows(out)
    out.summary = summary
    return out


def load(
    data_dir=None,
    num_images: int = 1000,
    seed: int = 0,
    image_size: int = 224,
    split_fractions=(0.8, 0.1, 0.1),
    train_fraction: float = 1.0,
    verify_images: bool = False,
    split_seed: int | None = None,
    test_per_class: int | None = None,
    validation_per_class: int | None = None,
    **generate_kwargs,
) -> DatasetDict:
    """The synthetic dataset as `train` / `validation` / `test`, read through the ISIC 2019 loader.

    Args:
        data_dir (*optional*): where the raw files are (generated there if missing); default `default_data_dir(...)`.
        num_images, seed, image_size: generation parameters.
        split_fractions, train_fraction: as in `isic2019.load` (`split_fractions` unused with per-class quotas).
        verify_images (`bool`, *optional*, defaults to `False`): the generator wrote them; set True to re-check.
        split_seed (`int`, *optional*): seed of the split and of the `train_fraction` subset; defaults to `seed`.
        test_per_class, validation_per_class (`int`, *optional*): class-balanced held-out splits: the
            generation adds `test_per_class + validation_per_class` images to every class, and whole lesion groups of
            each class go to test, then validation, until each holds at least that many images; the rest (the
            long-tailed mix) is train. 0 and 0: the fractional split of `split_fractions`. Both unset: the sizes
            the folder was generated with (`generation.json`), else 0 and 0.
        generate_kwargs: passed to `generate` (e.g. `shift=True` for the out-of-distribution set).

    Returns:
        `DatasetDict` (`dataset` = "synthetic", `criteria` filled, reports naming the criteria drawn) with `.summary`.
    """
    from . import isic2019

    split_seed = seed if split_seed is None else split_seed
    if test_per_class is None and validation_per_class is None:  # the folder's own held-out sizes, if any
        recorded = (read_generation(data_dir).get("held_out_per_class") if data_dir is not None else None) or {}
        test_per_class, validation_per_class = recorded.get("test", 0), recorded.get("validation", 0)
    quotas = {"test": test_per_class or 0, "validation": validation_per_class or 0}
    if quotas["test"] < 0 or quotas["validation"] < 0:
        raise ValueError(f"test_per_class / validation_per_class must be >= 0, got {quotas}")
    if any(quotas.values()):
        generate_kwargs["held_out_per_class"] = quotas
    root = ensure_generated(data_dir, num_images=num_images, seed=seed, image_size=image_size, **generate_kwargs)
    isic_dir = root / "isic2019"
    criteria = read_criteria(isic_dir)

    def hook(row, rec):
        found = criteria.get(rec["image_id"])
        if found is None:
            raise ValueError(f"{isic_dir / 'synthetic_criteria.csv'}: no row for image {rec['image_id']!r}")
        row["criteria"] = found
        row["report"] = criteria_report(found, rec["code"])
        return row

    dd = isic2019.load(
        isic_dir,
        split_fractions=(1.0, 0.0, 0.0) if any(quotas.values()) else split_fractions,
        seed=split_seed,
        train_fraction=1.0 if any(quotas.values()) else train_fraction,
        verify_images=verify_images,
        dataset_name="synthetic",
        row_hook=hook,
    )
    if any(quotas.values()):
        dd = _apply_quota_split(dd, quotas, split_seed, train_fraction)
        dd.summary.settings.update({"split_fractions": None, "per_class_quotas": quotas, "train_fraction": train_fraction})
    dd.summary.settings["generation"] = json.loads((root / "generation.json").read_text())
    return dd


__all__ = [
    "CLASS_MIX",
    "CRITERIA",
    "CRITERION_PROBABILITIES",
    "SHIFT",
    "class_counts",
    "criterion_masks",
    "default_data_dir",
    "ensure_generated",
    "generate",
    "load",
    "mask_paths",
    "read_criteria",
    "read_generation",
    "slug",
]
