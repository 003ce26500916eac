"""End to end: a LoRA trained by the real trainer, saved by the save nodes, loads elsewhere as the trained model."""
import os

import pytest

torch = pytest.importorskip("torch")


pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one torch thread for this module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import numpy as np
    from PIL import Image

    from comfyui_dreambooth.training.data.settings import ConceptSettings, DataSettings
    from comfyui_dreambooth.training.models.tiny import build_tiny_model
    from comfyui_dreambooth.training.settings import DreamBoothSettings
    from comfyui_dreambooth.training.trainer import train

    root = tmp_path_factory.mktemp("trained")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    base = build_tiny_model("sd1")
    concept = ConceptSettings(instance_dir=str(images), instance_prompt="a photo of sks dog", instance_token="sks",
                              concept_type="object")
    settings = DreamBoothSettings(use_lora=True, lora_rank=4, lora_alpha=2.0, steps_per_image=2, max_train_steps=3,
                                  learning_rate=1e-2, text_encoder_ratio=1.0, mixed_precision="no", seed=0,
                                  save_every_epochs=0, preview_every_epochs=0,
                                  data=DataSettings(resolution=64, bucketing=False))
    result = train(base, [concept], settings, output_root=str(root / "runs"))
    return base, result.model


def _outputs(unet, te):
    g = torch.Generator().manual_seed(0)
    x, enc = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    ids = torch.randint(0, 49000, (1, 77), generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([300]), enc).sample, te(ids).last_hidden_state


def test_trained_lora_saved_by_the_node_loads_in_diffusers_and_as_checkpoint(trained, tmp_path):
    import copy

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from comfyui_dreambooth.nodes import comfy_compat
    from comfyui_dreambooth.nodes.save import SaveCheckpoint, SaveLoRA
    from comfyui_dreambooth.training.export.lora import load_kohya_lora
    from comfyui_dreambooth.training.models import load_model

    base, model = trained
    expected = _outputs(model.unet, model.text_encoders[0])
    assert not torch.allclose(expected[0], _outputs(base.unet, base.text_encoders[0])[0], atol=1e-4)  # it trained
    assert not torch.allclose(expected[1], _outputs(base.unet, base.text_encoders[0])[1], atol=1e-4)

    with comfy_compat.using_output_directory(tmp_path), torch.inference_mode():
        lora_path = SaveLoRA().save(model, "sks_dog", "fp32")["result"][0]
        ckpt_path = SaveCheckpoint().save(model, "sks_dog", "safetensors", "fp32")["result"][0]
    assert os.path.dirname(lora_path) == str(tmp_path / "loras")

    _, meta = load_kohya_lora(lora_path)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_max_train_steps"]) == ("4", "2.0", "3")

    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=copy.deepcopy(base.text_encoders[0]),
                                   tokenizer=base.tokenizers[0], unet=copy.deepcopy(base.unet),
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    # folder + weight_name: diffusers <= 0.37 refuses a bare file path while HF_HUB_OFFLINE is set
    pipe.load_lora_weights(os.path.dirname(lora_path), weight_name=os.path.basename(lora_path))
    for ours, theirs in zip(expected, _outputs(pipe.unet, pipe.text_encoder)):
        assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5)

    merged = load_model(ckpt_path)
    for ours, theirs in zip(expected, _outputs(merged.unet, merged.text_encoders[0])):
        assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5)
