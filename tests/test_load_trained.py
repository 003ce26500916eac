"""LoadTrained / training.reload and `sample --lora` (issue 20.5): a saved LoRA (every adapter type, with an Imagic
sidecar), a run folder (last or best) and a checkpoint folder come back onto the base exactly."""
import os

import pytest
import torch

from trainer_fixtures import make_concept, tiny_settings

pytestmark = pytest.mark.usefixtures("single_thread")


def _random_adapters(model, lora_type, seed=1):
    """The base with adapters of `lora_type` on the UNet and text encoder, every adapter tensor random."""
    from comfyui_dreambooth.training.setup.adapters import add_adapters, adapter_parameters

    with torch.inference_mode(False):
        adapted = add_adapters(model, rank=4, alpha=2.0, lora_type=lora_type, on_text_encoder=True, seed=3,
                               unet_targets="attention")
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in adapter_parameters(adapted):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return adapted


def _unet_out(model):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, 8, 8), generator=gen)
    emb = torch.randn((1, 77, model.unet.config.cross_attention_dim), generator=gen)
    with torch.no_grad():
        return model.unet(x, torch.tensor([500]), emb).sample


@pytest.mark.parametrize("lora_type", ["lora", "dora", "loha", "lokr"])
def test_lora_file_round_trip(sd1, tmp_path, lora_type):
    from comfyui_dreambooth.training.export.lora import kohya_lora_state, save_kohya_lora
    from comfyui_dreambooth.training.reload import load_trained

    trained = _random_adapters(sd1, lora_type)
    path = save_kohya_lora(trained, str(tmp_path / "x.safetensors"), dtype="fp32")
    loaded = load_trained(sd1, path)
    want, got = kohya_lora_state(trained), kohya_lora_state(loaded)
    assert set(want) == set(got) and all(torch.allclose(want[k], got[k], rtol=1e-6, atol=0) for k in want)
    assert torch.allclose(_unet_out(loaded), _unet_out(trained), atol=1e-6)
    assert loaded.unet is not sd1.unet and loaded.metadata["loaded_from"] == path


def test_lora_file_brings_its_imagic_sidecar(sd1, tmp_path):
    from comfyui_dreambooth.training.export.lora import save_kohya_lora
    from comfyui_dreambooth.training.models.imagic_embeddings import IMAGIC_KEYS, is_imagic, with_imagic
    from comfyui_dreambooth.training.reload import load_trained

    trained = _random_adapters(sd1, "lora")
    extras = {k: torch.randn(1, 77, 32) if "pooled" not in k else torch.randn(1, 32) for k in IMAGIC_KEYS}
    trained = with_imagic(trained, extras)
    if not is_imagic(trained):
        pytest.skip("IMAGIC_KEYS need other shapes here")
    path = save_kohya_lora(trained, str(tmp_path / "edit.safetensors"), dtype="fp32")
    loaded = load_trained(sd1, path)
    assert is_imagic(loaded) and all(torch.equal(loaded.extras[k], trained.extras[k].float()) for k in extras)


def test_foreign_lora_and_bad_paths_are_clear_errors(sd1, tmp_path):
    from safetensors.torch import save_file

    from comfyui_dreambooth.training.reload import load_trained

    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 4)}, foreign)
    with pytest.raises(ValueError, match="not written by this pack"):
        load_trained(sd1, foreign)
    with pytest.raises(FileNotFoundError, match="no such LoRA file, run folder or checkpoint folder"):
        load_trained(sd1, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a run folder"):
        load_trained(sd1, str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_run_folder_round_trip(sd1, tmp_path, use_lora):
    """The run's final state, a checkpoint folder, and keep_best's best, onto the base again."""
    from comfyui_dreambooth.training.reload import load_trained
    from comfyui_dreambooth.training.trainer import train

    settings = tiny_settings(use_lora=use_lora, learning_rate=1e-2 if use_lora else 1e-3, save_every_epochs=1,
                             keep_last_checkpoints=0, validate_every_steps=4, keep_best=True, validation_samples=0,
                             text_encoder_ratio=0.5)
    result = train(sd1, [make_concept(tmp_path)], settings, output_root=str(tmp_path / "out"))
    loaded = load_trained(sd1, result.run_dir)
    assert torch.equal(_unet_out(loaded), _unet_out(result.model))
    for a, b in zip(loaded.text_encoders, result.model.text_encoders):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    step4 = os.path.join(result.run_dir, "checkpoints", "step-0000004")
    from_checkpoint = load_trained(sd1, step4)
    assert not torch.equal(_unet_out(from_checkpoint), _unet_out(result.model))
    best = load_trained(sd1, result.run_dir, "best")
    assert best.metadata["loaded_from"] == result.info["best"]["checkpoint"]
    assert sd1.unet is not loaded.unet


def test_sample_cli_takes_a_lora(capsys, sd1, tmp_path):
    from comfyui_dreambooth import cli
    from comfyui_dreambooth.training.export.lora import save_kohya_lora
    from comfyui_dreambooth.training.models import save_single_file

    base = str(tmp_path / "base.safetensors")
    save_single_file(sd1, base, dtype="fp32")
    lora = save_kohya_lora(_random_adapters(sd1, "lora"), str(tmp_path / "l.safetensors"), dtype="fp32")
    args = ["sample", base, "--prompt", "a photo of sks dog", "--steps", "2", "--width", "64", "--height", "64",
            "--scheduler", "ddim"]
    assert cli.main([*args, "--out", str(tmp_path / "plain.png")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "lora.png"), "--lora", lora]) == 0
    assert (tmp_path / "plain.png").read_bytes() != (tmp_path / "lora.png").read_bytes()
    assert cli.main([*args, "--out", str(tmp_path / "x.png"), "--lora", str(tmp_path / "nope")]) != 0
    assert "--lora not found" in capsys.readouterr().err


def test_load_trained_node(sd1, tmp_path, monkeypatch):
    from comfyui_dreambooth.nodes import comfy_compat
    from comfyui_dreambooth.nodes.models import PATH_BELOW, LoadTrained
    from comfyui_dreambooth.training.export.lora import kohya_lora_state, save_kohya_lora

    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    trained = _random_adapters(sd1, "lora")
    path = save_kohya_lora(trained, str(loras / "mine.safetensors"), dtype="fp32")
    monkeypatch.setattr(comfy_compat, "full_model_path", lambda kind, name: str(tmp_path / "models" / kind / name))
    assert "lora" in LoadTrained.INPUT_TYPES()["required"]
    for args in (("mine.safetensors",), (PATH_BELOW, "last", path)):
        model, info = LoadTrained().load(sd1, *args)
        assert path in info and kohya_lora_state(model).keys() == kohya_lora_state(trained).keys()
    with pytest.raises(ValueError, match="path is empty"):
        LoadTrained().load(sd1, PATH_BELOW)
