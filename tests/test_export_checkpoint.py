"""training/export/checkpoint.py: full-model exports merge adapters (on a copy) and load back as plain models."""
import json

import pytest

torch = pytest.importorskip("torch")

from comfyui_dreambooth.training.export import checkpoint as C  # noqa: E402
from comfyui_dreambooth.training.models import load_model  # noqa: E402
from comfyui_dreambooth.training.models.tiny import build_tiny_model  # noqa: E402
from comfyui_dreambooth.training.setup import adapters as A  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one torch thread for this module


@pytest.fixture(scope="module")
def base():
    return build_tiny_model("sd1")


@pytest.fixture(scope="module")
def trained(base):
    model = A.add_adapters(base, rank=4, alpha=2.0, lora_type="lora", on_text_encoder=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in A.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _outputs(model):
    g = torch.Generator().manual_seed(0)
    x, enc = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    ids = torch.randint(0, 49000, (1, 77), generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([300]), enc).sample, model.text_encoders[0](ids).last_hidden_state


def _close(a, b, atol=1e-5):
    return all(torch.allclose(x, y, atol=atol, rtol=1e-5) for x, y in zip(a, b))


@pytest.mark.parametrize("ext", ["safetensors", "ckpt"])
def test_checkpoint_of_a_lora_model_loads_as_the_trained_model(trained, base, tmp_path, ext):
    path = C.export_checkpoint(trained, str(tmp_path / f"merged.{ext}"), dtype="fp32")
    loaded = load_model(path)
    assert not A.has_adapters(loaded)
    assert _close(_outputs(loaded), _outputs(trained))
    assert not _close(_outputs(loaded), _outputs(base), atol=1e-3)
    assert A.has_adapters(trained)                 # the model given to the export still carries its adapters


def test_checkpoint_metadata_names_architecture_and_merge(trained, tmp_path):
    from safetensors import safe_open

    path = C.export_checkpoint(trained, str(tmp_path / "meta.safetensors"), dtype="fp16")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in list(f.keys())[:20]}
    assert dtypes == {torch.float16}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "meta" and meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["dreambooth.merged_adapter"].startswith("lora rank 4 alpha 2")


def test_full_model_and_ema_choices(base, trained, tmp_path):
    import copy

    path = C.export_checkpoint(base, str(tmp_path / "plain.safetensors"), dtype="fp32")
    assert _close(_outputs(load_model(path)), _outputs(base))
    with pytest.raises(ValueError, match="use_ema"):
        C.export_checkpoint(trained, str(tmp_path / "ema.safetensors"), use_ema=True)
    with pytest.raises(ValueError, match="dtype"):
        C.export_checkpoint(trained, str(tmp_path / "x.safetensors"), dtype="int8")
    # EMA of the adapter weights: the checkpoint carries the merged EMA UNet
    ema = copy.deepcopy(trained.unet)
    with torch.no_grad():
        for name, p in ema.named_parameters():
            if ".default" in name:
                p.mul_(0.5)
    with_ema = trained.replace(ema_unet=ema)
    path = C.export_checkpoint(with_ema, str(tmp_path / "ema.safetensors"), dtype="fp32", use_ema=True)
    expected = trained.replace(unet=ema)
    assert _close(_outputs(load_model(path)), _outputs(expected))


def test_diffusers_folder_of_a_lora_model(trained, tmp_path):
    folder = C.export_diffusers(trained, str(tmp_path / "pipe"), dtype="fp32")
    with open(tmp_path / "pipe" / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "StableDiffusionPipeline"
    loaded = load_model(folder)
    assert _close(_outputs(loaded), _outputs(trained))
