"""nodes/save.py: SaveLoRA / SaveCheckpoint / SaveDiffusers called the way ComfyUI calls them (headless folders)."""
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from comfyui_dreambooth.nodes import comfy_compat  # noqa: E402
from comfyui_dreambooth.nodes.save import NODE_CLASS_MAPPINGS, SaveCheckpoint, SaveDiffusers, SaveLoRA  # noqa: E402
from comfyui_dreambooth.training.models.tiny import build_tiny_model  # noqa: E402
from comfyui_dreambooth.training.setup import adapters as A  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one torch thread for this module


@pytest.fixture()
def output_dir(tmp_path):
    with comfy_compat.using_output_directory(tmp_path):
        yield tmp_path


@pytest.fixture(scope="module")
def models():
    with torch.inference_mode():                     # as ComfyUI runs every node
        base = build_tiny_model("sd1")
        lora = A.add_adapters(base, rank=2, on_text_encoder=True)
    return base, lora


def test_node_contract():
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, (kind, options) in spec.get(section, {}).items():
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert cls.CATEGORY == "DreamBooth/save" and cls.OUTPUT_NODE is True
        assert cls.RETURN_TYPES == ("STRING",) and hasattr(cls, cls.FUNCTION)
        assert spec["required"]["model"][0] == "DB_MODEL"


def test_save_lora_into_the_loras_folder_with_clean_unique_names(models, output_dir):
    _, lora = models
    node = SaveLoRA()
    with torch.inference_mode():
        first = node.save(lora, "../../outside/my_lora", "fp16")
        second = node.save(lora, "../../outside/my_lora", "fp16")
        third = node.save(lora, "outside/my_lora.safetensors", "fp32", overwrite=True)
    path = first["result"][0]
    assert path == str(output_dir / "loras" / "outside" / "my_lora.safetensors") and os.path.isfile(path)
    assert second["result"][0] == str(output_dir / "loras" / "outside" / "my_lora_2.safetensors")
    assert third["result"][0] == path
    assert "outside/my_lora.safetensors" in first["ui"]["text"][0]
    assert not (output_dir.parent / "outside").exists()


def test_save_lora_without_adapters_says_what_to_do(models, output_dir):
    base, _ = models
    with pytest.raises(ValueError, match="SaveCheckpoint"):
        SaveLoRA().save(base, "x", "fp16")
    assert not (output_dir / "loras").exists()


def test_save_checkpoint_and_diffusers(models, output_dir):
    from comfyui_dreambooth.training.models import load_model

    _, lora = models
    with torch.inference_mode():
        ckpt = SaveCheckpoint().save(lora, "merged", "ckpt", "fp16")["result"][0]
        st = SaveCheckpoint().save(lora, "C:\\merged", "safetensors", "fp32")["result"][0]
        folder = SaveDiffusers().save(lora, "pipe", "fp16")["result"][0]
    assert ckpt == str(output_dir / "checkpoints" / "merged.ckpt") and os.path.isfile(ckpt)
    assert st == str(output_dir / "checkpoints" / "merged.safetensors")
    assert folder == str(output_dir / "diffusers" / "pipe")
    assert os.path.isfile(os.path.join(folder, "model_index.json"))
    assert not A.has_adapters(load_model(st)) and A.has_adapters(lora)
    with pytest.raises(ValueError, match="use_ema"):
        SaveCheckpoint().save(lora, "ema", "safetensors", "fp16", use_ema=True)


def test_node_module_import_is_cheap():
    code = ("import sys, comfyui_dreambooth.nodes.save; "
            "print(sorted(m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
