"""bitsandbytes' CPU backend neither fetches Hub kernels ("kernels-community") nor warns that it cannot."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# a stand-in for bitsandbytes/backends/cpu/ops.py on an AVX512-BF16 CPU (this machine may lack one), and a `kernels`
# package whose get_kernel records the download it would start
FAKE_OPS = '''
import logging
logger = logging.getLogger(__name__)
try:
    from kernels import get_kernel
    get_kernel("kernels-community/quantization-bitsandbytes", version=1)
except Exception as exc:
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", exc)
'''
FAKE_KERNELS = '''
import os
def get_kernel(repo_id, version=None):
    open(os.environ["MARKER"], "w").write(repo_id)
    raise RuntimeError("offline")
'''


def _run(tmp_path, guarded: bool):
    (tmp_path / "fakebnb").mkdir(exist_ok=True)
    (tmp_path / "fakebnb" / "__init__.py").write_text("")
    (tmp_path / "fakebnb" / "ops.py").write_text(FAKE_OPS)
    (tmp_path / "kernels").mkdir(exist_ok=True)
    (tmp_path / "kernels" / "__init__.py").write_text(FAKE_KERNELS)
    marker = tmp_path / f"download_attempted_{guarded}"
    code = textwrap.dedent(f"""
        import logging
        logging.basicConfig(level=logging.WARNING)
        import configuration_skinclip_vl as c
        if {guarded}:
            c.install_hub_kernel_guard("fakebnb.ops")
        import fakebnb.ops
        import kernels  # still importable afterwards
    """)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}", MARKER=str(marker))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return marker.exists(), result.stderr


def test_guard_blocks_the_download_and_the_warning(tmp_path):
    attempted, stderr = _run(tmp_path, guarded=False)
    assert attempted and "kernels-community" in stderr  # the stand-in does what bitsandbytes does
    attempted, stderr = _run(tmp_path, guarded=True)
    assert not attempted, "get_kernel was called: a Hub download would have been attempted"
    assert "kernels-community" not in stderr


def test_guard_targets_the_module_bitsandbytes_has():
    import configuration_skinclip_vl as c

    spec = importlib.util.find_spec("bitsandbytes")
    source = Path(spec.origin).parent / "backends" / "cpu" / "ops.py"
    assert c.BITSANDBYTES_HUB_KERNEL_MODULE == "bitsandbytes.backends.cpu.ops"
    text = source.read_text()
    assert "from kernels import get_kernel" in text and "kernels-community" in text
    # installed on import: the module, when imported, is executed by the guard's loader
    import trainer.arguments  # noqa: F401  (transformers' TrainingArguments imports bitsandbytes)

    module = sys.modules.get("bitsandbytes.backends.cpu.ops")
    if module is not None:
        assert type(module.__spec__.loader).__name__ == "_Loader"
