"""Model loading/saving: detection, shape inference, exact round trips, offline use and bad input."""
import json
import os
import socket

import pytest
import torch
from helpers import assert_same_model, assert_same_weights
from safetensors.torch import load_file, save_file

from comfyui_dreambooth.training.models import (ModelLoadError, build_tiny_model, inspect_model, load_model,
                                                save_diffusers, save_single_file, to_single_file_state)
from comfyui_dreambooth.training.models.detect import detect_family, infer_unet_config

FAMILIES = ["sd1", "sd2", "sdxl"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["safetensors", "ckpt", "diffusers"])
def test_loads_each_family_in_each_layout(tiny_models, tiny_files, family, layout):
    model = load_model(tiny_files[family][layout])
    assert model.family == family
    assert model.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert_same_model(model, tiny_models[family])
    assert len(model.text_encoders) == (2 if family == "sdxl" else 1)
    assert model.source_hash and model.source.endswith(os.path.basename(tiny_files[family][layout]))


@pytest.mark.parametrize("family", FAMILIES)
def test_shape_inference_without_stored_config(tiny_models, tmp_path, family):
    """Community files carry no config: everything structural is read from the tensor shapes."""
    state = to_single_file_state(tiny_models[family], dtype="fp32")
    path = tmp_path / "community.safetensors"
    save_file(state, str(path))                         # no metadata at all
    model = load_model(str(path))
    assert model.family == family
    assert_same_model(model, tiny_models[family])
    ref = tiny_models[family].unet.config
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "use_linear_projection"):
        assert tuple(model.unet.config[key]) == tuple(ref[key]) if isinstance(ref[key], (list, tuple)) \
            else model.unet.config[key] == ref[key], key


def test_shape_inference_nonstandard_unet(tmp_path):
    """A deeper, wider-than-tiny layout (3 levels, 2 res blocks, transformer depth 2) is inferred exactly."""
    from diffusers import UNet2DConditionModel

    model = build_tiny_model("sd1")
    unet = UNet2DConditionModel(sample_size=32, layers_per_block=2, block_out_channels=(32, 64, 64),
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, transformer_layers_per_block=2, norm_num_groups=32)
    model = model.replace(unet=unet)
    state = to_single_file_state(model, dtype="fp32")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    cfg = infer_unet_config(shapes, detect_family(shapes))
    assert cfg["layers_per_block"] == 2 and tuple(cfg["block_out_channels"]) == (32, 64, 64)
    assert cfg["transformer_layers_per_block"] == (2, 2, 2)   # last level: the mid block's depth
    save_file(state, str(tmp_path / "deep.safetensors"))
    assert_same_weights(load_model(str(tmp_path / "deep.safetensors")).unet, unet)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["fp16", "fp32", "bf16"])
def test_single_file_to_diffusers_to_single_file_is_bit_exact(tiny_files, tmp_path, family, dtype):
    src = load_model(tiny_files[family]["safetensors"])
    a = tmp_path / "a.safetensors"
    save_single_file(src, str(a), dtype=dtype)
    folder = save_diffusers(load_model(str(a)), str(tmp_path / "diff"), dtype=dtype)
    b = tmp_path / "b.safetensors"
    save_single_file(load_model(folder), str(b), dtype=dtype)
    sa, sb = load_file(str(a)), load_file(str(b))
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_round_trip_keeps_extra_keys_and_old_clip_names(tiny_models, tmp_path):
    """Non-module tensors (schedule buffers) survive; old SD1 files without 'text_model.' load; EMA copies drop."""
    state = to_single_file_state(tiny_models["sd1"], dtype="fp32")
    state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
             for k, v in state.items()}
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    state["model_ema.decay"] = torch.tensor(0.999)
    for i in range(101):
        state[f"model_ema.w{i}"] = torch.zeros(1)
    save_file(state, str(tmp_path / "old.safetensors"))
    model = load_model(str(tmp_path / "old.safetensors"))
    assert_same_model(model, tiny_models["sd1"])
    assert torch.equal(model.extras["alphas_cumprod"], state["alphas_cumprod"])
    assert model.metadata["dropped_ema_tensors"] == 102
    resaved = to_single_file_state(model, dtype="fp32")
    assert "alphas_cumprod" in resaved and not any(k.startswith("model_ema") for k in resaved)


def test_prediction_type_resolution(tiny_models, tmp_path):
    # the file name never decides (tests/test_model_identity.py covers every source of the answer)
    sd2 = to_single_file_state(tiny_models["sd2"], dtype="fp32")
    assert "v_pred" in sd2                               # a v model carries ComfyUI's marker, SD2 too
    save_file(sd2, str(tmp_path / "v2-512-base.safetensors"))
    assert load_model(str(tmp_path / "v2-512-base.safetensors")).prediction_type == "v_prediction"
    save_file({k: v for k, v in sd2.items() if k != "v_pred"}, str(tmp_path / "v2-768.safetensors"))
    # no marker, and the tiny UNet lacks the tensor ComfyUI measures: epsilon, as ComfyUI loads it
    assert load_model(str(tmp_path / "v2-768.safetensors")).prediction_type == "epsilon"
    assert load_model(str(tmp_path / "v2-768.safetensors"),
                      prediction_type="v_prediction").prediction_type == "v_prediction"
    assert load_model(str(tmp_path / "v2-512-base.safetensors"), prediction_type="epsilon").prediction_type == "epsilon"
    # a v-prediction SD1 model carries ComfyUI's 'v_pred' marker and keeps it through save/load
    v1 = tiny_models["sd1"].replace(prediction_type="v_prediction", zero_terminal_snr=True)
    path = save_single_file(v1, str(tmp_path / "v1.safetensors"), dtype="fp32")
    keys = load_file(path).keys()
    assert "v_pred" in keys and "ztsnr" in keys
    state = {k: v for k, v in load_file(path).items()}
    save_file(state, str(tmp_path / "v1_nometa.safetensors"))
    loaded = load_model(str(tmp_path / "v1_nometa.safetensors"))
    assert loaded.prediction_type == "v_prediction" and loaded.zero_terminal_snr
    folder = save_diffusers(loaded, str(tmp_path / "v1_diff"), dtype="fp32")
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f)["prediction_type"] == "v_prediction"
    assert load_model(folder).prediction_type == "v_prediction"
    with pytest.raises(ModelLoadError, match="prediction_type"):
        load_model(path, prediction_type="x0")


def test_vae_override(tiny_files, tmp_path):
    other = build_tiny_model("sd1", seed=7)
    vae_state = {k[len("first_stage_model."):]: v for k, v in to_single_file_state(other, dtype="fp32").items()
                 if k.startswith("first_stage_model.")}
    save_file(vae_state, str(tmp_path / "vae.safetensors"))              # standalone VAE file: bare LDM keys
    model = load_model(tiny_files["sd1"]["safetensors"], vae_path=str(tmp_path / "vae.safetensors"))
    assert_same_weights(model.vae, other.vae)


def test_offline_no_network(tiny_files, monkeypatch):
    """Loading (tokenizers included) and sampling never touch the network."""
    from comfyui_dreambooth.training.models import tokenizing
    from comfyui_dreambooth.training.sampling import generate

    def no_network(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizing.clip_tokenizer.cache_clear()
    model = load_model(tiny_files["sdxl"]["diffusers"])
    assert model.tokenizers[0]("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert model.tokenizers[1].pad_token_id == 0 and model.tokenizers[0].pad_token_id == 49407
    image = generate(model, "a photo of sks dog", steps=1, width=32, height=32)
    assert image.shape == (1, 32, 32, 3)


def test_inspect_model(tiny_files):
    info = inspect_model(tiny_files["sdxl"]["safetensors"])
    assert info["family"] == "sdxl" and info["prediction_type"] == "epsilon" and info["dtype"] == "float32"
    assert set(info["parameters"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    model = load_model(tiny_files["sdxl"]["safetensors"])
    assert info["parameters"]["unet"] == sum(p.numel() for p in model.unet.parameters())
    assert info["parameters"]["text_encoder_2"] == sum(p.numel() for p in model.text_encoders[1].parameters())
    assert inspect_model(tiny_files["sd1"]["diffusers"])["family"] == "sd1"
    json.dumps(info)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope.safetensors"))


def test_truncated_safetensors(tiny_files, tmp_path):
    data = open(tiny_files["sd1"]["safetensors"], "rb").read()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(str(bad))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 100)
    with pytest.raises(ModelLoadError, match=str(garbage.name)):
        load_model(str(garbage))


def test_non_sd_state_dict_says_what_was_found(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 4),
               "lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ModelLoadError, match=r"not a Stable Diffusion checkpoint.*lora_unet_down_blocks_0"):
        load_model(str(path))
    with pytest.raises(ModelLoadError, match="not a diffusers model"):
        load_model(str(tmp_path))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil(str(marker))}, str(path))
    with pytest.raises(ModelLoadError, match="refused"):
        load_model(str(path))
    assert not marker.exists()


def test_failed_save_keeps_previous_file(tiny_models, tmp_path, monkeypatch):
    import safetensors.torch as st

    path = tmp_path / "model.safetensors"
    save_single_file(tiny_models["sd1"], str(path), dtype="fp32")
    before = path.read_bytes()

    def disk_full(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_single_file(tiny_models["sd2"], str(path), dtype="fp32")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_adapter_weights_must_be_merged_before_saving(tiny_models, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model
    import copy

    unet = inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), copy.deepcopy(tiny_models["sd1"].unet))
    with pytest.raises(ValueError, match="merge them first"):
        save_single_file(tiny_models["sd1"].replace(unet=unet), str(tmp_path / "x.safetensors"))


def test_file_hash_is_stable_across_resaves_and_changes_with_weights(tiny_models, tmp_path):
    """Two saves of the same weights hash the same (safetensors orders metadata keys arbitrarily); any weight
    change gives a new hash, so caches and finished runs are reused exactly when they should be."""
    from comfyui_dreambooth.training.models import file_hash

    hashes = {file_hash(save_single_file(tiny_models["sd1"], str(tmp_path / f"m{i}.safetensors"), dtype="fp16"))
              for i in range(3)}
    assert len(hashes) == 1
    other = build_tiny_model("sd1", seed=1)
    assert file_hash(save_single_file(other, str(tmp_path / "o.safetensors"), dtype="fp16")) not in hashes
