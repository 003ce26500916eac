"""DreamBoothToComfy (nodes/convert.py): a clear error outside ComfyUI, the node contract, the state dict it hands
over (adapters merged on a copy); opt-in (COMFYUI_DIR): with ComfyUI's own modules it builds MODEL/CLIP/VAE equal
to what CheckpointLoaderSimple loads from the saved file, fixes the prediction type, and ComfyUI's sampler runs."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import comfyui_env
from comfyui_dreambooth import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_dreambooth.nodes import convert
from comfyui_dreambooth.training.setup import adapters as A


@pytest.fixture(scope="module")
def lora_model(tiny_models):
    model = A.add_adapters(tiny_models["sd1"], rank=4, on_text_encoder=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in A.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_registered_with_display_name_and_category():
    assert NODE_CLASS_MAPPINGS["DreamBoothToComfy"] is convert.DreamBoothToComfy
    assert NODE_DISPLAY_NAME_MAPPINGS["DreamBoothToComfy"].startswith("DreamBooth")
    cls = convert.DreamBoothToComfy
    assert cls.CATEGORY.startswith("DreamBooth") and cls.DESCRIPTION
    assert cls.RETURN_TYPES == ("MODEL", "CLIP", "VAE") and len(cls.OUTPUT_TOOLTIPS) == 3
    types = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in types[section].items():
            assert spec[1].get("tooltip"), name


def test_outside_comfyui_it_says_what_to_do_instead(tiny_models):
    with pytest.raises(convert.ComfyUIRequired) as info:
        convert.DreamBoothToComfy().convert(tiny_models["sd1"], "fp16", False)
    message = str(info.value)
    assert "only runs inside ComfyUI" in message and "SaveCheckpoint" in message and "SampleTrained" in message


def test_hands_over_merged_weights_without_touching_the_model(lora_model, tiny_models):
    from comfyui_dreambooth.training.models import to_single_file_state

    state = convert._comfy_state_dict(lora_model, "fp32", False)
    merged = to_single_file_state(A.merged_copy(lora_model), dtype="fp32")
    base = to_single_file_state(tiny_models["sd1"], dtype="fp32")
    assert set(state) == set(merged) == set(base)
    assert all(torch.equal(state[k], merged[k]) for k in state)
    assert any(not torch.equal(state[k], base[k]) for k in state if "model.diffusion_model." in k)
    assert any(not torch.equal(state[k], base[k]) for k in state if k.startswith("cond_stage_model."))
    assert A.has_adapters(lora_model)                       # the received model still carries its adapters


def test_dtype_and_ema_are_checked(tiny_models):
    assert convert._comfy_state_dict(tiny_models["sd1"], "fp16", False)["model.diffusion_model.out.2.weight"].dtype \
        == torch.float16
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        convert._comfy_state_dict(tiny_models["sd1"], "fp8", False)
    with pytest.raises(ValueError, match="no EMA weights"):
        convert._comfy_state_dict(tiny_models["sd1"], "fp16", True)


# --- opt-in: inside a real ComfyUI (its modules loaded, as when ComfyUI runs the node) -----------------------------
REAL_SCRIPT = textwrap.dedent(r'''
    import os, sys
    comfy_dir, pack_parent, tests_dir, work = sys.argv[1:5]
    sys.path[:0] = [comfy_dir, pack_parent, tests_dir]
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    import folder_paths, comfy.sd, comfy.model_sampling, comfy.model_patcher, nodes
    from comfyui_dreambooth.nodes import comfy_compat, convert
    from comfyui_dreambooth.training.export.checkpoint import export_checkpoint
    from comfyui_dreambooth.training.models import build_tiny_model
    from comfyui_dreambooth.training.setup import adapters as A
    from sd15_shaped import build_sd15_shaped_model
    assert comfy_compat.in_comfyui()

    # a LoRA-trained SD1.5-shaped model (random adapters, so the merge changes the weights)
    model = A.add_adapters(build_sd15_shaped_model(seed=1), rank=4, on_text_encoder=True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in A.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    patcher, clip, vae = convert.DreamBoothToComfy().convert(model, "fp16", False)
    assert isinstance(patcher, comfy.model_patcher.ModelPatcher), type(patcher)
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    assert A.has_adapters(model)

    # the same objects CheckpointLoaderSimple makes from SaveCheckpoint's file
    path = os.path.join(work, "saved.safetensors")
    export_checkpoint(model, path, dtype="fp16")
    loaded, loaded_clip, loaded_vae = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"))[:3]
    for mine, theirs, what in ((patcher.model.state_dict(), loaded.model.state_dict(), "model"),
                               (clip.cond_stage_model.state_dict(), loaded_clip.cond_stage_model.state_dict(), "clip"),
                               (vae.first_stage_model.state_dict(), loaded_vae.first_stage_model.state_dict(), "vae")):
        assert set(mine) == set(theirs), (what, sorted(set(mine) ^ set(theirs))[:5])
        # SD1 has no text projection: ComfyUI drops it on load and leaves its own uninitialised (supported_models.py)
        bad = [k for k in mine if not torch.equal(mine[k], theirs[k]) and not k.endswith("text_projection.weight")]
        assert not bad, (what, bad[:5])

    # ComfyUI's sampler and VAE run on it
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks dog"))
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    samples = nodes.common_ksampler(patcher, 0, 2, 5.0, "euler", "normal", cond, cond, latent)[0]["samples"]
    image = vae.decode(samples)
    assert tuple(image.shape) == (1, 64, 64, 3) and bool(torch.isfinite(image).all()), image.shape

    # a v-prediction SD1 model: ComfyUI's guess (epsilon) is corrected
    vpred = build_sd15_shaped_model(seed=3, prediction_type="v_prediction")
    vp = convert.to_comfy(vpred, dtype="fp16")[0]
    assert isinstance(vp.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)
    assert isinstance(patcher.get_model_object("model_sampling"), comfy.model_sampling.EPS)
    assert not isinstance(patcher.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION)

    # the tiny test model is no architecture ComfyUI knows: a clear error
    try:
        convert.to_comfy(build_tiny_model("sd1"))
    except RuntimeError as e:
        assert "recognise" in str(e), e
    else:
        raise AssertionError("tiny model converted")
    print("CONVERT OK")
''')


@pytest.mark.skipif(not comfyui_env.comfyui_dir(), reason=comfyui_env.skip_reason())
def test_inside_real_comfyui_it_matches_checkpoint_loader_and_samples(tmp_path):
    pack_parent = tmp_path / "pack"
    comfyui_env.link_pack(str(pack_parent))
    script = tmp_path / "convert_probe.py"
    script.write_text(REAL_SCRIPT)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([comfyui_env.comfyui_python(), str(script), comfyui_env.comfyui_dir(), str(pack_parent),
                           tests_dir, str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=comfyui_env.comfyui_dir(), env=env)
    assert done.returncode == 0 and "CONVERT OK" in done.stdout, (done.stdout + done.stderr)[-4000:]
