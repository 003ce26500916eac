"""The pack in both dependency worlds ComfyUI installs have (issue 9):
  (a) transformers 4.x + huggingface-hub 0.x + diffusers <= 0.37, (b) transformers 5 + hub >= 1 + the newest diffusers.
CI runs the whole suite in (b) and this module in (a) (`.ci/world-a-constraints.txt`), so everything here must pass
in both: offline tokenizers, loading both layouts, LoRA with the text encoder under gradient checkpointing, full
fine-tune, kohya LoRA + checkpoint export, sampling. Tiny models, ~1 min on one CPU thread.
"""
import pytest

pytestmark = pytest.mark.usefixtures("single_thread")


def test_versions_reported():
    """Which world this run is in, for the log (`pytest -rA` / failures show it)."""
    import diffusers
    import huggingface_hub
    import transformers

    world = "a" if int(transformers.__version__.split(".")[0]) < 5 else "b"
    print(f"world {world}: transformers {transformers.__version__}, huggingface-hub {huggingface_hub.__version__}, "
          f"diffusers {diffusers.__version__}")


# --------------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad,pad_id", [("<|endoftext|>", 49407), ("!", 0)])
def test_clip_tokenizer_offline(pad, pad_id, tmp_path):
    from comfyui_dreambooth.training.models import tokenizing

    tokenizing.clip_tokenizer.cache_clear()
    tok = tokenizing.clip_tokenizer(pad)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok.pad_token_id == pad_id and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tok("A Photo of SKS, dog")["input_ids"][1:-1] == [320, 1125, 539, 48136, 267, 1929]
    padded = tok("a dog", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[:3] == [49406, 320, 1929] and padded[3:5] == [49407, pad_id]
    long = tok(" ".join(["dog"] * 100), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    assert long == [1929] * 100
    tok.save_pretrained(str(tmp_path / "tok"))            # a diffusers folder carries it; reloads the same
    again = type(tok).from_pretrained(str(tmp_path / "tok"))
    assert again("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert again.pad_token_id == pad_id


# --------------------------------------------------------------------------------------------------------------
# Loading both layouts
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_load_single_file_and_diffusers_folder(family, tmp_path):
    from helpers import assert_same_model

    from comfyui_dreambooth.training.models import build_tiny_model, load_model, save_diffusers, save_single_file

    model = build_tiny_model(family)
    single = load_model(save_single_file(model, str(tmp_path / "m.safetensors"), dtype="fp32"))
    folder = load_model(save_diffusers(model, str(tmp_path / "m_diffusers"), dtype="fp32"))
    for loaded in (single, folder):
        assert loaded.family == family and loaded.prediction_type == model.prediction_type
        assert_same_model(loaded, model)
        assert [t.pad_token_id for t in loaded.tokenizers] == [t.pad_token_id for t in model.tokenizers]
        assert loaded.tokenizers[0]("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]


# --------------------------------------------------------------------------------------------------------------
# Training: LoRA with the text encoder under gradient checkpointing, full fine-tune
# --------------------------------------------------------------------------------------------------------------
def _encoder_spy(monkeypatch):
    """Records, for every CLIP encoder forward in training mode, whether gradient checkpointing was on."""
    from transformers.models.clip import modeling_clip

    seen = []
    real = modeling_clip.CLIPEncoder.forward

    def spy(self, *args, **kw):
        if self.training and __import__("torch").is_grad_enabled():
            seen.append(bool(getattr(self, "gradient_checkpointing", False)))
        return real(self, *args, **kw)

    monkeypatch.setattr(modeling_clip.CLIPEncoder, "forward", spy)
    return seen


@pytest.fixture(scope="module")
def lora_run(sd1, tmp_path_factory):
    """sd1 LoRA on UNet + text encoder, gradient checkpointing on (issue 9, 4d)."""
    from trainer_fixtures import make_concept, tiny_settings

    from comfyui_dreambooth.training.trainer import train

    root = tmp_path_factory.mktemp("compat_lora")
    settings = tiny_settings(text_encoder_ratio=1.0, gradient_checkpointing=True, steps_per_image=0,
                             max_train_steps=3)
    with pytest.MonkeyPatch.context() as mp:
        seen = _encoder_spy(mp)
        result = train(sd1, [make_concept(root)], settings, output_root=str(root / "out"))
    return result, seen


def test_lora_text_encoder_learns_with_gradient_checkpointing(sd1, lora_run):
    from comfyui_dreambooth.training.setup.adapters import adapted_layers

    result, seen = lora_run
    assert result.steps == 3 and seen and all(seen), seen          # the TE ran checkpointed, in training mode
    for name, part in (("text encoder", result.model.text_encoders[0]), ("unet", result.model.unet)):
        layers = adapted_layers(part)
        assert layers, name
        ups = [p for n, p in part.named_parameters() if "lora_B" in n]
        assert ups and all(float(p.detach().abs().sum()) > 0 for p in ups), f"{name}: LoRA up weights still zero"
    assert result.model.text_encoders[0] is not sd1.text_encoders[0]


def test_full_fine_tune_with_gradient_checkpointing(sd1, tmp_path, monkeypatch):
    import torch
    from trainer_fixtures import make_concept, tiny_settings

    from comfyui_dreambooth.training.trainer import train

    settings = tiny_settings(use_lora=False, text_encoder_ratio=1.0, gradient_checkpointing=True,
                             learning_rate=1e-3, steps_per_image=0, max_train_steps=2)
    seen = _encoder_spy(monkeypatch)
    result = train(sd1, [make_concept(tmp_path)], settings, output_root=str(tmp_path / "out"))
    assert result.steps == 2 and seen and all(seen)
    for base, trained in ((sd1.unet, result.model.unet), (sd1.text_encoders[0], result.model.text_encoders[0])):
        b, t = base.state_dict(), trained.state_dict()
        changed = [k for k in b if not torch.equal(b[k], t[k])]
        assert any("attn" in k for k in changed), sorted(changed)[:5]


# --------------------------------------------------------------------------------------------------------------
# Export + sampling
# --------------------------------------------------------------------------------------------------------------
def test_export_kohya_lora(lora_run, tmp_path):
    from comfyui_dreambooth.training.export.lora import load_kohya_lora, save_kohya_lora

    result, _ = lora_run
    state, meta = load_kohya_lora(save_kohya_lora(result.model, str(tmp_path / "sks.safetensors"), dtype="fp16"))
    te_up = [k for k in state if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    unet_up = [k for k in state if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert te_up and unet_up
    assert all(float(state[k].float().abs().sum()) > 0 for k in te_up + unet_up)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"


def test_export_checkpoint_and_diffusers_then_sample(sd1, lora_run, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from comfyui_dreambooth.training.export.checkpoint import export_checkpoint, export_diffusers
    from comfyui_dreambooth.training.models import load_model
    from comfyui_dreambooth.training.sampling import generate

    result, _ = lora_run
    merged = load_model(export_checkpoint(result.model, str(tmp_path / "sks.safetensors"), dtype="fp32"))
    assert merged.family == "sd1"
    base_te, merged_te = sd1.text_encoders[0].state_dict(), merged.text_encoders[0].state_dict()
    assert set(base_te) == set(merged_te) and any(not torch.equal(base_te[k], merged_te[k]) for k in base_te)
    images = {}
    for name, model in (("trained", result.model), ("checkpoint", merged)):
        images[name] = generate(model, "a photo of sks dog", steps=2, width=32, height=32, seed=3)
        assert images[name].shape == (1, 32, 32, 3) and torch.isfinite(images[name]).all()
    assert torch.allclose(images["trained"], images["checkpoint"], atol=1e-3)   # merged LoRA = the adapters
    # the diffusers folder loads in diffusers itself (offline), tokenizer included
    folder = export_diffusers(result.model, str(tmp_path / "sks_diffusers"), dtype="fp32")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    assert pipe.tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], merged.unet.state_dict()["conv_in.weight"])
