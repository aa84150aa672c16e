"""Shared fixtures: tiny random component checkpoints (written once per session) and the real-data fixture folder."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]  # on sys.path through `pythonpath` in pyproject.toml
# the remote-code files every saved model carries, written out here independently of adapters_skinclip_vl.REMOTE_CODE_FILES
REMOTE_FILES = (
    "configuration_skinclip_vl.py",
    "modeling_skinclip_vl.py",
    "processing_skinclip_vl.py",
    "grounding_skinclip_vl.py",
    "adapters_skinclip_vl.py",
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REAL_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "real"


def real_fixture(*parts) -> Path:
    """Path under ../shared/fixtures/real/, or skip the test (with the reason) when it is absent."""
    path = REAL_FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data fixture {path} is absent (it lives in ../shared/fixtures/real/, outside the repo)")
    return path


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory):
    """`{"vision": dir, "decoder": dir}` of tiny random CLIP and Qwen2.5-VL checkpoints (tools/tiny_components.py)."""
    from tools.tiny_components import write_tiny_components

    return write_tiny_components(tmp_path_factory.mktemp("components"), seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_components):
    from processing_skinclip_vl import SkinCLIPVLProcessor

    return SkinCLIPVLProcessor.from_components(tiny_components["vision"], tiny_components["decoder"])


@pytest.fixture()
def tiny_model(tiny_components):
    import torch

    from modeling_skinclip_vl import SkinCLIPVLForDiagnosis

    torch.manual_seed(0)
    return SkinCLIPVLForDiagnosis.from_components(tiny_components["vision"], tiny_components["decoder"]).eval()
