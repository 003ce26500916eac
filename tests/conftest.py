"""Shared fixtures: tiny random-init models of each family, saved once per session in both layouts."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _PackRootIsNotATestPackage:
    """The repository root is the pack itself: it has the __init__.py that ComfyUI imports by path under the
    folder's name, and a clone's folder may have any name ('comfyui-dreambooth' by default). pytest would collect
    the root as a test package and import that __init__.py by the folder's name, which fails for a name that is not
    an identifier ("attempted relative import with no known parent package" on every test). Collect it as a plain
    folder instead: the tests use the installed `comfyui_dreambooth`. A plugin, not a conftest hook: the root's
    collector is made before any conftest below it applies."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if str(path) == PACK_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    if not config.pluginmanager.has_plugin("pack-root-is-not-a-test-package"):
        config.pluginmanager.register(_PackRootIsNotATestPackage(), "pack-root-is-not-a-test-package")


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
