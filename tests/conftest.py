"""Shared fixtures: tiny random-init models of each family, saved once per session in both layouts."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_models():
    """family → SDModel (built once; tests must not mutate them)."""
    from comfyui_dreambooth.training.models import build_tiny_model

    return {f: build_tiny_model(f) for f in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="session")
def tiny_files(tiny_models, tmp_path_factory):
    """family → {"safetensors": path, "ckpt": path, "diffusers": folder} (fp32, so loads compare exactly)."""
    from comfyui_dreambooth.training.models import save_diffusers, save_single_file

    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for fam, model in tiny_models.items():
        out[fam] = {
            "safetensors": save_single_file(model, str(root / f"tiny_{fam}.safetensors"), dtype="fp32"),
            "ckpt": save_single_file(model, str(root / f"tiny_{fam}.ckpt"), dtype="fp32"),
            "diffusers": save_diffusers(model, str(root / f"tiny_{fam}_diffusers"), dtype="fp32"),
        }
    return out


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module: tiny-model steps run several times faster than with threads fighting
    over 2 busy cores (torch's default), and results do not depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd1():
    """A fresh tiny SD1 model per test module (trainer tests check it is never modified)."""
    from comfyui_dreambooth.training.models import build_tiny_model

    return build_tiny_model("sd1")
