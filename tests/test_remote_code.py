"""Remote code: a saved directory loads with trust_remote_code in a fresh offline process, and imports only what
DESIGN.md allows."""

import ast
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REMOTE_FILES, REPO_ROOT
from PIL import Image

SIBLINGS = {name[:-3] for name in REMOTE_FILES}
ALLOWED = {"torch", "transformers", "numpy", "huggingface_hub", "safetensors", "PIL"}
GUARDED_ONLY = {"peft", "bitsandbytes"}
# the repository's training package: a saved model does not carry it, so remote code may import it only lazily and
# guarded (the adapter `push_to_hub`, which says what is missing)
REPOSITORY_ONLY = {"trainer"}
METADATA = [{"age_approx": 65, "sex": "male", "anatom_site_general": "head/neck"}, None]


def _imports(tree):
    """Yield (top-level module name, eager) for every import; eager = runs at import time outside try/except."""

    def visit(node, eager):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            eager = False
        if isinstance(node, ast.Try):
            for child in node.body:
                yield from visit(child, False)
            for child in node.handlers + node.orelse + node.finalbody:
                yield from visit(child, eager)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], eager, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: must be a sibling remote-code file
                yield "." + (node.module or "").split(".")[0], eager, node.lineno
            else:
                yield node.module.split(".")[0], eager, node.lineno
        for child in ast.iter_child_nodes(node):
            yield from visit(child, eager)

    yield from visit(tree, True)


@pytest.mark.parametrize("filename", REMOTE_FILES)
def test_remote_files_import_only_allowed_packages(filename):
    tree = ast.parse((REPO_ROOT / filename).read_text(), filename=filename)
    stdlib = set(sys.stdlib_module_names)
    problems = []
    for name, eager, line in _imports(tree):
        if name.startswith("."):
            if name[1:] not in SIBLINGS:
                problems.append(f"{filename}:{line} relative import {name!r} is not a remote-code file")
        elif name in ALLOWED or name in stdlib or name in SIBLINGS:
            continue
        elif name in GUARDED_ONLY or name in REPOSITORY_ONLY:
            if eager:
                problems.append(f"{filename}:{line} imports {name!r} at import time without try/except")
        else:
            problems.append(f"{filename}:{line} imports {name!r}, which DESIGN.md does not allow in remote code")
    assert not problems, "\n".join(problems)


def test_remote_files_are_all_listed_and_copied_with_a_saved_model():
    """Every top-level `*_skinclip_vl.py` is remote code: listed here and in `REMOTE_CODE_FILES` (what a save copies)."""
    from adapters_skinclip_vl import REMOTE_CODE_FILES

    assert set(REMOTE_CODE_FILES) == set(REMOTE_FILES)
    assert {p.name for p in REPO_ROOT.glob("*_skinclip_vl.py")} == set(REMOTE_FILES)
    setup = (REPO_ROOT / "setup.cfg").read_text()
    assert all(f"    {name[:-3]}\n" in setup for name in REMOTE_FILES), "setup.cfg py_modules"


def test_import_checker_catches_violations():
    source = textwrap.dedent(
        """
        import os
        import peft
        import trainer
        from matplotlib import pyplot
        try:
            import bitsandbytes
        except ImportError:
            bitsandbytes = None
        def f():
            import peft
            try:
                from trainer.hub import push_adapter_to_hub
            except ImportError:
                raise
            from .configuration_skinclip_vl import SkinCLIPVLConfig
        """
    )
    found = {(name, eager) for name, eager, _ in _imports(ast.parse(source))}
    assert ("peft", True) in found and ("matplotlib", True) in found and ("trainer", True) in found
    assert ("trainer", False) in found
    assert ("bitsandbytes", False) in found and ("peft", False) in found
    assert (".configuration_skinclip_vl", False) in found


FRESH_PROCESS_SCRIPT = """
import importlib.util, json, os, sys
# `pip install -e .` maps the repository's modules through an editable finder: hide it (and the repository on
# sys.path), so that only the copies in the saved directory can be used
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.realpath(sys.argv[4])]
import numpy as np, torch
for name in ("configuration", "modeling", "processing", "grounding", "adapters"):
    assert importlib.util.find_spec(f"{name}_skinclip_vl") is None, "the repository is importable: not a remote-code test"
from transformers import AutoConfig, AutoModel, AutoProcessor
save_dir, out_file = sys.argv[1], sys.argv[2]
inputs = json.loads(sys.argv[3])
config = AutoConfig.from_pretrained(save_dir, trust_remote_code=True)
model = AutoModel.from_pretrained(save_dir, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(save_dir, trust_remote_code=True)
for obj in (config, model, processor):
    assert type(obj).__module__.startswith("transformers_modules."), type(obj).__module__
# the grounding and adapter files travel with the model and are imported from its copy
model_module = importlib.import_module(type(model).__module__)
for helper in (model_module.grounding_token_maps, model_module.load_adapter_model):
    assert helper.__module__.startswith("transformers_modules."), helper.__module__
assert type(model).__name__ == "SkinCLIPVLForDiagnosis" and model.has_adapter() and not model.training
with torch.no_grad():
    out = model(**processor(images=inputs["images"], metadata=inputs["metadata"]), logits_to_keep=1)
np.save(out_file, out.class_logits.numpy())
print("labels:", [config.id2label[i] for i in range(config.num_labels)])
# the post-processing travels with the saved processor file: diagnose() and post_process_diagnosis() of the copy
diagnoses = model.diagnose(inputs["images"], metadata=inputs["metadata"], processor=processor, max_new_tokens=4)
direct = processor.post_process_diagnosis(
    out.class_logits, [(90, 70)] * 2, config.id2label, temperature=config.calibration_temperature,
    pooling_attention=out.pooling_attention, metadata=[{"age": 40, "colour": "red"}, None],
)
for d in diagnoses + direct:
    assert type(d).__module__.startswith("transformers_modules."), type(d).__module__
    assert d.focal_map.shape == (70, 90) and d.focal_map.max() == 1.0
try:
    model.push_to_hub("org/adapter")  # needs the repository's trainer.hub, which is not importable here
except ImportError as err:
    push_error = str(err)
else:
    push_error = None
print("POST" + json.dumps({
    "diagnose": [[d.probabilities[config.id2label[i]] for i in range(config.num_labels)] for d in diagnoses],
    "direct": [[d.probabilities[config.id2label[i]] for i in range(config.num_labels)] for d in direct],
    "rationale_tokens": [len(d.token_ids) if d.rationale is not None else -1 for d in diagnoses],
    "direct_warnings": [d.warnings for d in direct],
    "temperature": config.calibration_temperature,
    "push_error": push_error,
}))
"""


def test_fresh_process_trust_remote_code_load(tiny_model, tiny_processor, tmp_path):
    import json

    peft_model = tiny_model.apply_lora(verbose=False)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.eval()
    save_dir = tmp_path / "saved"
    peft_model.base_model.model.save_pretrained(save_dir)
    tiny_processor.save_pretrained(save_dir)
    for name in REMOTE_FILES:
        assert (save_dir / name).is_file(), name

    rng = np.random.default_rng(7)
    images = []
    for i in range(2):
        path = tmp_path / f"lesion_{i}.png"
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    with torch.no_grad():
        expected = peft_model(
            **tiny_processor(images=images, metadata=METADATA), logits_to_keep=1
        ).class_logits.numpy()

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "modules_cache"),
        TOKENIZERS_PARALLELISM="false",
    )
    out_file = tmp_path / "class_logits.npy"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS_SCRIPT,
            str(save_dir),
            str(out_file),
            json.dumps({"images": images, "metadata": METADATA}),
            str(REPO_ROOT),
        ],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    assert "labels: ['MEL', 'NV', 'BCC', 'AK', 'BKL', 'DF', 'VASC', 'SCC']" in result.stdout
    assert not str(workdir).startswith(str(REPO_ROOT)) and not str(save_dir).startswith(str(REPO_ROOT))
    got = np.load(out_file)
    assert got.shape == (2, 8)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    post = json.loads(result.stdout.split("POST", 1)[1])
    calibrated = torch.softmax(torch.tensor(expected) / post["temperature"], dim=-1).numpy()
    np.testing.assert_allclose(post["diagnose"], calibrated, atol=1e-5)
    np.testing.assert_allclose(post["direct"], calibrated, atol=1e-5)
    assert all(0 <= n <= 4 for n in post["rationale_tokens"])  # a rationale was generated (-1: none)
    assert post["direct_warnings"] == [["metadata keys ignored (not age, sex or site): ['colour']"], []]
    assert post["push_error"] is not None and "trainer.hub" in post["push_error"]
