"""Model identity (prediction type, zero-terminal SNR) from the weights and the file's own markers, never its name.

Community-style fixtures are built here: a tiny model saved by the pack, then rewritten without the pack's
metadata (no comfyui_dreambooth.config, no modelspec.*) and without marker keys, as a file from the internet.
"""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_dreambooth import cli
from comfyui_dreambooth.training.models import (build_tiny_model, inspect_model, load_model, save_diffusers,
                                                save_single_file)

SD2_BIAS = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"   # ComfyUI's SD2 v test


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread):
    yield


def standard_sd2(prediction_type="epsilon", in_channels=4):
    """A tiny SD2 whose UNet has SD2's block layout (4 levels x 2 res blocks: output_blocks 0..11, the last with
    attention), so ComfyUI's `output_blocks.11....norm1.bias` exists; narrow widths keep it small."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, in_channels=in_channels, out_channels=4, layers_per_block=2,
                                block_out_channels=(32, 32, 64, 64), norm_num_groups=32, cross_attention_dim=32,
                                attention_head_dim=(1, 1, 1, 1), use_linear_projection=True, upcast_attention=True,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval().requires_grad_(False)
    return build_tiny_model("sd2").replace(unet=unet, prediction_type=prediction_type)


@pytest.fixture(scope="module")
def sd2_std():
    return standard_sd2()


def with_std(n, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g)
    return (t - t.mean()) / t.std(unbiased=False) * std


def community_file(model, path, *, bias_std=None, add=None, drop=("v_pred", "ztsnr")):
    """Save with the pack, then rewrite as a community file: no metadata, no markers (unless `add`ed)."""
    save_single_file(model, str(path), dtype="fp32")
    state = load_file(str(path))
    for k in drop:
        state.pop(k, None)
    if bias_std is not None:
        assert SD2_BIAS in state
        state[SD2_BIAS] = with_std(state[SD2_BIAS].numel(), bias_std)
    state.update(add or {})
    os.remove(path)
    save_file(state, str(path))                      # metadata None: nothing of the pack's left
    with safe_open(str(path), "pt") as f:
        assert not f.metadata()
    return str(path)


def identity(model):
    return model.metadata["identity"]


# --- SD2: ComfyUI's norm-bias statistic, whatever the name says --------------------------------------------------
@pytest.mark.parametrize("name,std,expected", [
    ("v2-1_512-ema-pruned.safetensors", 0.01, "epsilon"),       # stock epsilon name; old rule said v (no "base")
    ("merged-base-v.safetensors", 0.2, "v_prediction"),         # a v merge named "base"; old rule said epsilon
    ("v2-1_512-ema-pruned.safetensors", 0.2, "v_prediction"),
    ("merged-base-v.safetensors", 0.01, "epsilon"),
])
def test_sd2_prediction_type_from_norm_bias_not_name(sd2_std, tmp_path, name, std, expected):
    path = community_file(sd2_std, tmp_path / name, bias_std=std)
    model = load_model(path)
    assert model.prediction_type == expected
    ident = identity(model)
    assert ident["prediction_type"] == expected
    assert ident["prediction_type_source"].startswith(f"sd2 norm-bias std {std:.4f} ")
    assert ("> 0.09" in ident["prediction_type_source"]) == (expected == "v_prediction")
    assert ident["zero_terminal_snr"] is False
    info = inspect_model(path)                     # the same answer without loading the UNet
    assert info["prediction_type"] == expected and info["prediction_type_source"] == ident["prediction_type_source"]


def test_sd2_statistic_reads_one_tensor_lazily(sd2_std, tmp_path, monkeypatch):
    """inspect_model decides SD2's type reading only the norm-bias tensor, no other weight."""
    from comfyui_dreambooth.training.models.state_dict import LazyStateDict

    path = community_file(sd2_std, tmp_path / "v2.safetensors", bias_std=0.2)
    read = []
    original = LazyStateDict.get
    monkeypatch.setattr(LazyStateDict, "get", lambda self, key: read.append(key) or original(self, key))
    assert inspect_model(path)["prediction_type"] == "v_prediction"
    assert read == [SD2_BIAS]


def test_sd2_without_the_tensor_or_inpainting_is_epsilon(tiny_models, tmp_path):
    # the 2-level tiny SD2 has no output_blocks.11: ComfyUI says epsilon, whatever the name
    path = community_file(tiny_models["sd2"], tmp_path / "v2-1_768-ema-pruned.safetensors")
    model = load_model(path)
    assert model.prediction_type == "epsilon"
    assert "no output_blocks.11" in identity(model)["prediction_type_source"]
    # an inpainting UNet (9 input channels) is epsilon even with a v-like statistic (ComfyUI's SD20.model_type)
    inpaint = community_file(standard_sd2(in_channels=9), tmp_path / "inpaint-768-v.safetensors", bias_std=0.2)
    info = inspect_model(inpaint)
    assert info["prediction_type"] == "epsilon" and "inpainting" in info["prediction_type_source"]


# --- markers: v_pred / ztsnr keys, sidecar yaml, pack metadata, explicit choice ------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_v_pred_and_ztsnr_keys(tiny_models, tmp_path, family):
    empty = torch.tensor([])
    path = community_file(tiny_models[family], tmp_path / f"{family}-base-eps.safetensors",
                          add={"v_pred": empty, "ztsnr": empty})
    model = load_model(path)
    assert (model.prediction_type, model.zero_terminal_snr) == ("v_prediction", True)
    assert identity(model)["prediction_type_source"] == "'v_pred' key in the state dict"
    assert identity(model)["zero_terminal_snr_source"] == "'ztsnr' key in the state dict"
    assert "v_pred" not in model.extras and "ztsnr" not in model.extras
    # without markers: the family default, whatever the name ("...v..." says nothing)
    plain = load_model(community_file(tiny_models[family], tmp_path / f"{family}-768-v.safetensors"))
    assert (plain.prediction_type, plain.zero_terminal_snr) == ("epsilon", False)
    assert identity(plain)["prediction_type_source"] == f"family default ({family}: epsilon)"
    assert identity(plain)["zero_terminal_snr_source"] == "no marker (default off)"


A1111_V_YAML = """model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"   # v-prediction
    linear_start: 0.00085
    use_ema: False
"""


def test_sidecar_yaml(sd2_std, tiny_models, tmp_path):
    # the weights say epsilon; the A1111 sidecar says v
    path = community_file(sd2_std, tmp_path / "model.safetensors", bias_std=0.01)
    (tmp_path / "model.yaml").write_text(A1111_V_YAML)
    model = load_model(path)
    assert model.prediction_type == "v_prediction"
    assert identity(model)["prediction_type_source"] == "sidecar model.yaml: parameterization v"
    assert inspect_model(path)["prediction_type"] == "v_prediction"
    # an SD1 file too, and the yaml may state zero-terminal SNR
    sd1 = community_file(tiny_models["sd1"], tmp_path / "anime.safetensors")
    (tmp_path / "anime.yaml").write_text(A1111_V_YAML.replace("use_ema: False", "rescale_betas_zero_snr: true"))
    m1 = load_model(sd1)
    assert (m1.prediction_type, m1.zero_terminal_snr) == ("v_prediction", True)
    assert identity(m1)["zero_terminal_snr_source"] == "sidecar anime.yaml"
    # "eps" beats the statistic
    vlike = community_file(sd2_std, tmp_path / "other.safetensors", bias_std=0.2)
    (tmp_path / "other.yaml").write_text("model:\n  params:\n    parameterization: 'eps'\n")
    assert load_model(vlike).prediction_type == "epsilon"


def test_sidecar_yaml_is_never_executed(tiny_models, tmp_path):
    marker = tmp_path / "pwned"
    path = community_file(tiny_models["sd1"], tmp_path / "evil.safetensors")
    (tmp_path / "evil.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    info = inspect_model(path)
    assert info["prediction_type"] == "epsilon" and not marker.exists()


def test_precedence(sd2_std, tmp_path):
    empty = torch.tensor([])
    # pack metadata / modelspec beat the weights statistic
    path = community_file(sd2_std, tmp_path / "a.safetensors", bias_std=0.2)
    save_file(load_file(path), path, metadata={"modelspec.prediction_type": "epsilon"})
    m = load_model(path)
    assert m.prediction_type == "epsilon"
    assert identity(m)["prediction_type_source"] == "modelspec.prediction_type = epsilon"
    # ComfyUI's CheckpointSave key counts too
    save_file(load_file(path), path, metadata={"modelspec.predict_key": "v"})
    assert inspect_model(path)["prediction_type"] == "v_prediction"
    # the sidecar yaml beats metadata
    save_file(load_file(path), path, metadata={"modelspec.prediction_type": "epsilon"})
    (tmp_path / "a.yaml").write_text(A1111_V_YAML)
    assert load_model(path).prediction_type == "v_prediction"
    # a v_pred key beats the sidecar
    (tmp_path / "a.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    save_file({**load_file(path), "v_pred": empty}, path)
    assert identity(load_model(path))["prediction_type_source"] == "'v_pred' key in the state dict"
    # the explicit choice beats everything, and says what the file says
    m = load_model(path, prediction_type="epsilon")
    assert m.prediction_type == "epsilon"
    assert identity(m)["prediction_type_source"] == ("explicit choice (prediction_type=epsilon); the file says "
                                                    "v_prediction: 'v_pred' key in the state dict")
    info = inspect_model(path)
    assert info["prediction_type"] == "v_prediction"


def test_explicit_choice_on_load_base_model(sd2_std, tmp_path):
    from comfyui_dreambooth.nodes.models import PATH_BELOW, LoadBaseModel

    path = community_file(sd2_std, tmp_path / "merged-base.safetensors", bias_std=0.2)
    model, info = LoadBaseModel().load(PATH_BELOW, prediction_type="auto", model_path=path)
    assert model.prediction_type == "v_prediction" and "sd2 norm-bias std 0.2000 > 0.09" in info
    assert "zero-terminal SNR off" in info
    model, info = LoadBaseModel().load(PATH_BELOW, prediction_type="epsilon", model_path=path)
    assert model.prediction_type == "epsilon"
    assert "explicit choice (prediction_type=epsilon); the file says v_prediction" in info


def test_info_reports_identity_and_sources(sd2_std, tmp_path, capsys):
    path = community_file(sd2_std, tmp_path / "v2-1_512-ema-pruned.safetensors", bias_std=0.01,
                          add={"ztsnr": torch.tensor([])})
    assert cli.main(["info", path]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prediction_type"] == "epsilon"
    assert report["prediction_type_source"] == "sd2 norm-bias std 0.0100 <= 0.09"
    assert report["zero_terminal_snr"] is True
    assert report["zero_terminal_snr_source"] == "'ztsnr' key in the state dict"


# --- what the pack saves carries its identity ------------------------------------------------------------------------
def _ckpt_contents(path):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["state_dict"], obj["dreambooth_metadata"]


@pytest.mark.parametrize("family,pred,ztsnr", [("sd2", "v_prediction", True), ("sd2", "epsilon", False),
                                               ("sd1", "v_prediction", False), ("sdxl", "v_prediction", True)])
def test_saved_checkpoints_round_trip_their_identity(tiny_models, sd2_std, tmp_path, family, pred, ztsnr):
    base = sd2_std if family == "sd2" else tiny_models[family]
    model = base.replace(prediction_type=pred, zero_terminal_snr=ztsnr)
    word = "v" if pred == "v_prediction" else "epsilon"
    for ext in ("safetensors", "ckpt"):
        path = save_single_file(model, str(tmp_path / f"trained.{ext}"), dtype="fp32")
        if ext == "safetensors":
            state = load_file(path)
            with safe_open(path, "pt") as f:
                meta = f.metadata()
        else:
            state, meta = _ckpt_contents(path)     # ComfyUI's load_torch_file reads obj["state_dict"]
        assert ("v_pred" in state) == (pred == "v_prediction") and ("ztsnr" in state) == ztsnr
        assert meta["modelspec.prediction_type"] == word and meta["modelspec.predict_key"] == word
        assert meta["modelspec.sai_model_spec"] and meta["modelspec.title"] == f"comfyui-dreambooth {family}"
        assert meta["modelspec.architecture"].startswith("stable-diffusion-")
        loaded = load_model(path)
        assert (loaded.prediction_type, loaded.zero_terminal_snr) == (pred, ztsnr)
        ident = identity(loaded)
        assert ident["prediction_type_source"] == ("'v_pred' key in the state dict" if pred == "v_prediction"
                                                   else "pack metadata (comfyui_dreambooth.config)")
        assert ident["zero_terminal_snr_source"] == ("'ztsnr' key in the state dict" if ztsnr
                                                     else "pack metadata (comfyui_dreambooth.config)")
        # the markers alone (metadata stripped, as a site that re-packs files would) still carry it
        bare = str(tmp_path / f"bare.{ext}")
        if ext == "safetensors":
            save_file(state, bare)
        else:
            torch.save({"state_dict": state}, bare)
        again = load_model(bare)
        if family == "sd2" and pred == "epsilon":
            assert "sd2 norm-bias std" in identity(again)["prediction_type_source"]
        assert (again.prediction_type, again.zero_terminal_snr) == (pred, ztsnr)


def test_diffusers_folder_identity(tiny_models, tmp_path):
    model = tiny_models["sd1"].replace(prediction_type="v_prediction", zero_terminal_snr=True)
    folder = save_diffusers(model, str(tmp_path / "folder"), dtype="fp32")
    loaded = load_model(folder)
    assert (loaded.prediction_type, loaded.zero_terminal_snr) == ("v_prediction", True)
    assert identity(loaded)["prediction_type_source"] == "pack metadata (comfyui_dreambooth.config)"
    # a plain diffusers folder (no ldm_extras): the scheduler config says both
    os.remove(os.path.join(folder, "ldm_extras.safetensors"))
    plain = load_model(folder)
    assert (plain.prediction_type, plain.zero_terminal_snr) == ("v_prediction", True)
    assert identity(plain) == {
        "prediction_type": "v_prediction",
        "prediction_type_source": "diffusers scheduler/scheduler_config.json prediction_type",
        "zero_terminal_snr": True,
        "zero_terminal_snr_source": "diffusers scheduler/scheduler_config.json rescale_betas_zero_snr"}
    info = inspect_model(folder)
    assert info["zero_terminal_snr"] is True and info["prediction_type_source"].startswith("diffusers scheduler")
    # folder -> single file -> folder keeps it
    single = save_single_file(plain, str(tmp_path / "from_folder.safetensors"), dtype="fp32")
    back = load_model(save_diffusers(load_model(single), str(tmp_path / "folder2"), dtype="fp32"))
    assert (back.prediction_type, back.zero_terminal_snr) == ("v_prediction", True)


def test_sd2_diffusers_folder_without_scheduler_uses_the_weights(sd2_std, tmp_path):
    """A folder that says nothing (no scheduler config, no pack metadata) gets ComfyUI's SD2 rule on its UNet."""
    import shutil

    path = community_file(sd2_std, tmp_path / "c.safetensors", bias_std=0.2)
    folder = save_diffusers(load_model(path, prediction_type="epsilon"), str(tmp_path / "f"), dtype="fp32")
    os.remove(os.path.join(folder, "ldm_extras.safetensors"))
    shutil.rmtree(os.path.join(folder, "scheduler"))
    loaded = load_model(folder)
    assert loaded.prediction_type == "v_prediction"
    assert identity(loaded)["prediction_type_source"] == "sd2 norm-bias std 0.2000 > 0.09"
