"""training/export/lora.py: kohya LoRA files — exact key set ComfyUI maps, diffusers round trip, numerics of every
adapter type as readers apply them, metadata, dtype, atomic write.

Opt-in: COMFYUI_DIR=<ComfyUI source> [COMFYUI_PYTHON=<its python>] also loads the files with ComfyUI's own code
(comfy.lora key maps and weight adapters) and checks zero unmatched keys and the applied weights.
"""
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from comfyui_dreambooth.training.export import lora as L  # noqa: E402
from comfyui_dreambooth.training.models.tiny import build_tiny_model  # noqa: E402
from comfyui_dreambooth.training.setup import adapters as A  # noqa: E402

FAMILIES = ("sd1", "sd2", "sdxl")


pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one torch thread for this module


@pytest.fixture(scope="module")
def bases():
    return {family: build_tiny_model(family) for family in FAMILIES}


def _trained(base, lora_type="lora", rank=4, alpha=3.0, seed=1, **kw):
    """An adapted model whose adapters hold non-trivial values, as after training."""
    model = A.add_adapters(base, rank=rank, alpha=alpha, lora_type=lora_type, on_text_encoder=True, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ---------------------------------------------------------------------------------------------------------------
# What ComfyUI's LoraLoader maps, rebuilt from the diffusers config the way comfy/lora.py does it:
# model_lora_keys_unet accepts "lora_unet_" + every diffusers weight path that comfy.utils.unet_to_diffusers lists
# for the UNet config ComfyUI detects; model_lora_keys_clip accepts lora_te_/lora_te1_/lora_te2_ +
# text_model_encoder_layers_<i>_<self_attn_{q,k,v,out}_proj | mlp_fc1 | mlp_fc2> for each CLIP layer.
# ---------------------------------------------------------------------------------------------------------------
RESNET = ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")
TRANSFORMER_2D = ("norm", "proj_in", "proj_out")
TRANSFORMER_BLOCK = ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2") + tuple(
    f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0"))
TOP_LEVEL = ("conv_in", "conv_out", "conv_norm_out", "time_embedding.linear_1", "time_embedding.linear_2",
             "class_embedding.linear_1", "class_embedding.linear_2", "add_embedding.linear_1",
             "add_embedding.linear_2")
CLIP_LAYERS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
               "mlp_fc2")


def comfy_unet_paths(unet) -> set:
    cfg = unet.config
    levels = len(cfg.block_out_channels)
    per_level = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * levels  # noqa: E731
    num_res = per_level(cfg.layers_per_block)
    layers = per_level(cfg.transformer_layers_per_block)
    depth = [layers[x] if cfg.down_block_types[x].startswith("CrossAttn") else 0 for x in range(levels)]
    paths = set()

    def transformer(prefix, blocks):
        paths.update(prefix + p for p in TRANSFORMER_2D)
        paths.update(f"{prefix}transformer_blocks.{t}.{p}" for t in range(blocks) for p in TRANSFORMER_BLOCK)

    for x in range(levels):
        for i in range(num_res[x]):
            paths.update(f"down_blocks.{x}.resnets.{i}.{p}" for p in RESNET)
            if depth[x]:
                transformer(f"down_blocks.{x}.attentions.{i}.", depth[x])
        paths.add(f"down_blocks.{x}.downsamplers.0.conv")
    transformer("mid_block.attentions.0.", layers[-1])
    paths.update(f"mid_block.resnets.{i}.{p}" for i in (0, 1) for p in RESNET)
    # ComfyUI lists output depths in input-level order and pops from the end (lowest resolution first)
    output_depths = [depth[x] for x in range(levels) for _ in range(num_res[x] + 1)]
    for x, blocks in enumerate(reversed(num_res)):
        for i in range(blocks + 1):
            paths.update(f"up_blocks.{x}.resnets.{i}.{p}" for p in RESNET)
            d = output_depths.pop()
            if d:
                transformer(f"up_blocks.{x}.attentions.{i}.", d)
        paths.add(f"up_blocks.{x}.upsamplers.0.conv")
    paths.update(TOP_LEVEL)
    return paths


def comfy_accepted_names(model) -> set:
    names = {"lora_unet_" + p.replace(".", "_") for p in comfy_unet_paths(model.unet)}
    prefixes = ["lora_te1", "lora_te2"] if model.family == "sdxl" else ["lora_te"]
    for prefix, te in zip(prefixes, model.text_encoders):
        names.update(f"{prefix}_text_model_encoder_layers_{i}_{layer}"
                     for i in range(te.config.num_hidden_layers) for layer in CLIP_LAYERS)
    return names


UNET_PRESET_ENDINGS = {
    "attention": ("_to_q", "_to_k", "_to_v", "_to_out_0"),
    "transformer": ("_to_q", "_to_k", "_to_v", "_to_out_0", "_proj_in", "_proj_out", "_ff_net_0_proj", "_ff_net_2"),
}
UNET_PRESET_ENDINGS["transformer+conv"] = UNET_PRESET_ENDINGS["transformer"] + (
    "_conv1", "_conv2", "_conv_shortcut", "_time_emb_proj", "_downsamplers_0_conv", "_upsamplers_0_conv")
TE_PRESET_ENDINGS = {"attention": CLIP_LAYERS[:4], "attention+mlp": CLIP_LAYERS}
# what each reader-side adapter (comfy/weight_adapter, LyCORIS) recognises after the layer name
KNOWN_SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"},
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("unet_targets,te_targets", [("transformer", "attention+mlp"), ("attention", "attention"),
                                                    ("transformer+conv", "attention+mlp")])
def test_key_set_is_exactly_what_comfyui_maps(bases, family, unet_targets, te_targets):
    model = A.add_adapters(bases[family], rank=2, on_text_encoder=True, unet_targets=unet_targets,
                           text_encoder_targets=te_targets)
    state = L.kohya_lora_state(model)
    prefixes = {key.split(".")[0] for key in state}
    # ComfyUI's map is a superset (conv_shortcut and up/downsamplers of every level); keep the layers this UNet has
    present = {"lora_unet_" + name.replace(".", "_") for name, _ in model.unet.named_modules()}
    accepted = comfy_accepted_names(model)
    expected = {n for n in accepted
                if n.startswith("lora_te") or n in present}
    expected = {n for n in expected
                if (n.startswith("lora_unet_") and n.endswith(UNET_PRESET_ENDINGS[unet_targets]))
                or (n.startswith("lora_te") and n.endswith(TE_PRESET_ENDINGS[te_targets]))}
    assert prefixes == expected, (sorted(prefixes - expected)[:5], sorted(expected - prefixes)[:5])
    for key in state:
        assert key.split(".", 1)[1] in {"lora_down.weight", "lora_up.weight", "alpha"}, key
    assert len(state) == 3 * len(prefixes)
    if family == "sdxl":
        assert any(p.startswith("lora_te1_") for p in prefixes) and any(p.startswith("lora_te2_") for p in prefixes)
    else:
        assert all(not p.startswith(("lora_te1_", "lora_te2_")) for p in prefixes)


@pytest.mark.parametrize("unet_targets", ["transformer", "transformer+conv"])
@pytest.mark.parametrize("lora_type", A.LORA_TYPES)
def test_every_adapter_type_writes_only_keys_readers_know(bases, lora_type, unet_targets):
    model = _trained(bases["sdxl"], lora_type, unet_targets=unet_targets)
    state = L.kohya_lora_state(model)
    accepted = comfy_accepted_names(model)
    for key in state:
        prefix, suffix = key.split(".", 1)
        assert prefix in accepted and suffix in KNOWN_SUFFIXES[lora_type], key


# ---------------------------------------------------------------------------------------------------------------
def reference_apply(entries: dict, weight):
    """The weight a kohya/LyCORIS reader builds from one layer's tensors at strength 1 (ComfyUI's formulas, with
    DoRA normalised by the adapted weight as in the DoRA paper and LyCORIS)."""
    w = weight.float()
    alpha = entries["alpha"].item() if "alpha" in entries else None
    if "lora_up.weight" in entries:
        up, down = entries["lora_up.weight"].float(), entries["lora_down.weight"].float()
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        scale = alpha / down.shape[0] if alpha is not None else 1.0
    elif "hada_w1_a" in entries:
        e = {k: v.float() for k, v in entries.items()}
        delta = ((e["hada_w1_a"] @ e["hada_w1_b"]) * (e["hada_w2_a"] @ e["hada_w2_b"])).reshape(w.shape)
        scale = alpha / e["hada_w1_b"].shape[0] if alpha is not None else 1.0
    else:
        e = {k: v.float() for k, v in entries.items()}
        dim = None
        w1 = e.get("lokr_w1")
        if w1 is None:
            w1, dim = e["lokr_w1_a"] @ e["lokr_w1_b"], e["lokr_w1_b"].shape[0]
        w2 = e.get("lokr_w2")
        if w2 is None:
            w2, dim = e["lokr_w2_a"] @ e["lokr_w2_b"], e["lokr_w2_b"].shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2).reshape(w.shape)
        scale = alpha / dim if (alpha is not None and dim is not None) else 1.0
    adapted = w + scale * delta
    if "dora_scale" in entries:
        norm = adapted.reshape(adapted.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (adapted.dim() - 1))
        adapted = adapted * entries["dora_scale"].float() / norm
    return adapted


def _layer_entries(state):
    layers = {}
    for key, tensor in state.items():
        prefix, suffix = key.split(".", 1)
        layers.setdefault(prefix, {})[suffix] = tensor
    return layers


def _module_paths(model):
    """kohya name -> (component index, module path): 0 = UNet, 1.. = text encoders."""
    parts = [("lora_unet", model.unet)] + list(zip(L.text_encoder_prefixes(model), model.text_encoders))
    out = {}
    for index, (prefix, module) in enumerate(parts):
        for path in A.adapted_layers(module):
            out[L.kohya_name(prefix, path)] = (index, path)
    return out


def _plain_weight(model, index, path):
    module = model.unet if index == 0 else model.text_encoders[index - 1]
    return module.get_submodule(path).weight


@pytest.mark.parametrize("lora_type", A.LORA_TYPES)
@pytest.mark.parametrize("family,unet_targets", [("sd1", "transformer"), ("sdxl", "transformer"),
                                                 ("sd1", "transformer+conv")])
def test_file_tensors_rebuild_the_trained_weights(bases, family, unet_targets, lora_type):
    """What a reader computes from the file equals the adapter-merged weights, for every layer and type (3x3
    convolutions included: LoCon)."""
    base = bases[family]
    model = _trained(base, lora_type, rank=4, alpha=3.0, unet_targets=unet_targets)
    merged = A.merged_copy(model)
    layers = _layer_entries(L.kohya_lora_state(model))
    paths = _module_paths(model)
    assert set(layers) == set(paths)
    for name, entries in layers.items():
        index, path = paths[name]
        rebuilt = reference_apply(entries, _plain_weight(base, index, path))
        expected = _plain_weight(merged, index, path)
        assert torch.allclose(rebuilt, expected, atol=2e-5, rtol=1e-5), (name, (rebuilt - expected).abs().max())


def test_lokr_with_two_full_factors_folds_its_scale(bases):
    """Tiny layers give LoKr two full factors: the file has no rank then, so alpha/rank must be inside lokr_w1."""
    model = _trained(bases["sd1"], "lokr", rank=4, alpha=1.0)
    state = L.kohya_lora_state(model)
    full = [(path, layer) for path, layer in A.adapted_layers(model.unet).items()
            if "default" in layer.lokr_w1 and "default" in layer.lokr_w2]
    assert full, "expected LoKr layers with two full factors in the tiny model"
    for path, layer in full:
        name = L.kohya_name("lora_unet", path)
        assert torch.allclose(state[f"{name}.lokr_w1"], layer.lokr_w1["default"].detach() * 0.25)
        assert torch.equal(state[f"{name}.lokr_w2"], layer.lokr_w2["default"].detach())
        assert state[f"{name}.alpha"].item() == 1.0


# ---------------------------------------------------------------------------------------------------------------
def _pipeline(base):
    import copy

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    unet = copy.deepcopy(base.unet)
    tes = [copy.deepcopy(te) for te in base.text_encoders]
    if base.family == "sdxl":
        return StableDiffusionXLPipeline(vae=base.vae, text_encoder=tes[0], text_encoder_2=tes[1],
                                         tokenizer=base.tokenizers[0], tokenizer_2=base.tokenizers[1], unet=unet,
                                         scheduler=EulerDiscreteScheduler(steps_offset=1))
    return StableDiffusionPipeline(vae=base.vae, text_encoder=tes[0], tokenizer=base.tokenizers[0], unet=unet,
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _unet_out(model_unet, family, cross_dim):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    enc = torch.randn(1, 77, cross_dim, generator=g)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                       "time_ids": torch.randn(1, 6, generator=g)}
    with torch.no_grad():
        return model_unet(x, torch.tensor([400]), enc, **kwargs).sample


def _te_out(te):
    ids = torch.randint(0, 49000, (1, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = te(ids)
    return out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_load_lora_weights_gives_the_trained_outputs(bases, family, tmp_path):
    base = bases[family]
    model = _trained(base, "lora", rank=4, alpha=3.0)
    path = L.save_kohya_lora(model, str(tmp_path / "trained.safetensors"), dtype="fp32")
    pipe = _pipeline(base)
    # folder + weight_name: diffusers <= 0.37 refuses a bare file path while HF_HUB_OFFLINE is set
    pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path))
    cross_dim = base.unet.config.cross_attention_dim
    ours, theirs = _unet_out(model.unet, family, cross_dim), _unet_out(pipe.unet, family, cross_dim)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-5), (theirs - ours).abs().max()
    assert not torch.allclose(_unet_out(base.unet, family, cross_dim), ours, atol=1e-3)   # the LoRA matters
    pipe_tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for ours_te, their_te, base_te in zip(model.text_encoders, pipe_tes, base.text_encoders):
        assert torch.allclose(_te_out(their_te), _te_out(ours_te), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(_te_out(base_te), _te_out(ours_te), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
def test_metadata_has_kohya_and_modelspec_keys(bases, tmp_path):
    base = bases["sd1"].replace(source="/models/checkpoints/base_v15.safetensors", source_hash="abc123")
    model = _trained(base, "lora", rank=8, alpha=4.0)
    training = {"learning_rate": 1e-4, "text_encoder_lr": 5e-5, "max_train_steps": 800, "batch_size": 2,
                "offset_noise": 0.05, "clip_skip": 1, "seed": 42, "lora_rank": 8, "optimizer": "AdamW",
                "data": {"resolution": 512, "random_flip": True},
                "num_train_images": 4, "num_reg_images": 0, "training_started_at": 1700000000.5,
                "dataset_dirs": {"sks_dog": {"n_repeats": 1, "img_count": 4}}, "trigger_phrase": "sks dog"}
    model = model.replace(metadata=dict(model.metadata, training=training))
    path = L.save_kohya_lora(model, str(tmp_path / "sks.safetensors"))
    state, meta = L.load_kohya_lora(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], float(meta["ss_network_alpha"])) == ("8", 4.0)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_output_name"] == "sks" and meta["ss_sd_model_name"] == "base_v15.safetensors"
    assert meta["ss_training_started_at"] == "1700000000.5"
    assert float(meta["ss_learning_rate"]) == 1e-4 == float(meta["ss_unet_lr"])
    assert float(meta["ss_text_encoder_lr"]) == 5e-5
    assert (meta["ss_max_train_steps"], meta["ss_num_train_images"], meta["ss_seed"]) == ("800", "4", "42")
    assert (meta["ss_batch_size_per_device"], meta["ss_noise_offset"], meta["ss_optimizer"]) == ("2", "0.05", "AdamW")
    assert (meta["ss_resolution"], meta["ss_flip_aug"], meta["ss_clip_skip"]) == ("512", "True", "1")
    assert json.loads(meta["ss_dataset_dirs"]) == {"sks_dog": {"img_count": 4, "n_repeats": 1}}
    assert "ss_lora_rank" not in meta and "ss_data" not in meta          # ours, not kohya's: kept in JSON only
    assert json.loads(meta["dreambooth.training"]) == training
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.title"] == "sks" and meta["modelspec.resolution"] == "512x512"
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["modelspec.encoder_layer"] == "1"
    assert meta["modelspec.trigger_phrase"] == "sks dog" and "modelspec.date" in meta
    assert meta["dreambooth.base_model_hash"] == "abc123"
    assert json.loads(meta["dreambooth.adapter"])["rank"] == 8
    # sd-webui-additional-networks hash: sha256 of the tensor bytes as saved with only the ss_* metadata
    from safetensors.torch import save

    import hashlib
    blob = save(state, {k: v for k, v in meta.items() if k.startswith("ss_")})
    body = blob[8 + int.from_bytes(blob[:8], "little"):]
    assert meta["sshs_model_hash"] == hashlib.sha256(body).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8


@pytest.mark.parametrize("family,lora_type,expected", [
    ("sdxl", "loha", ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "1024x1024", "epsilon")),
    ("sd2", "dora", ("sd_v2_v", "stable-diffusion-v2-768-v/lora", "768x768", "v")),
])
def test_metadata_per_family_and_type(bases, family, lora_type, expected):
    model = _trained(bases[family], lora_type, rank=2, alpha=1.0)
    meta = L.lora_metadata(model, title="t", training={}, timestamp=0)
    version, arch, resolution, prediction = expected
    assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == arch
    assert meta["modelspec.resolution"] == resolution and meta["modelspec.prediction_type"] == prediction
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == ("lora" if lora_type == "dora" else lora_type)
    assert meta["ss_v2"] == str(family == "sd2")


def test_metadata_from_the_trainers_settings_dict(bases):
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    settings = DreamBoothSettings().result_dict()
    model = _trained(bases["sd1"], "lora", rank=2, alpha=1.0)
    model = model.replace(metadata=dict(model.metadata, training=settings))
    meta = L.lora_metadata(model, title="t", timestamp=0)
    assert meta["ss_lr_scheduler"] == settings["lr_scheduler"]
    assert meta["ss_resolution"] == str(settings["data"]["resolution"])
    assert meta["ss_mixed_precision"] == settings["mixed_precision"]
    assert all(isinstance(v, str) for v in meta.values())
    assert "modelspec.encoder_layer" not in meta or settings["clip_skip"] >= 1     # 0 = the model's default


def test_dtype_and_exact_alpha(bases, tmp_path):
    model = _trained(bases["sd1"], "lora", rank=4, alpha=0.3)
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        state, _ = L.load_kohya_lora(L.save_kohya_lora(model, str(tmp_path / f"{dtype}.safetensors"), dtype=dtype))
        weights = [v for k, v in state.items() if not k.endswith(".alpha")]
        alphas = [v for k, v in state.items() if k.endswith(".alpha")]
        assert all(w.dtype == torch_dtype for w in weights)
        assert all(a.dtype == torch.float32 and a.dim() == 0 and a.item() == pytest.approx(0.3, rel=1e-7)
                   for a in alphas)
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        L.save_kohya_lora(model, str(tmp_path / "x.safetensors"), dtype="fp8")
    with pytest.raises(ValueError, match=".safetensors"):
        L.save_kohya_lora(model, str(tmp_path / "x.pt"))


def test_failed_save_keeps_the_previous_file(bases, tmp_path, monkeypatch):
    import safetensors.torch

    model = _trained(bases["sd1"])
    path = L.save_kohya_lora(model, str(tmp_path / "keep.safetensors"))
    before = open(path, "rb").read()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        L.save_kohya_lora(_trained(bases["sd1"], seed=5), path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]


def test_no_adapters_and_ema(bases, tmp_path):
    import copy

    with pytest.raises(L.NoAdaptersError, match="SaveCheckpoint"):
        L.kohya_lora_state(bases["sd1"])
    model = _trained(bases["sd1"])
    with pytest.raises(ValueError, match="use_ema"):
        L.kohya_lora_state(model, use_ema=True)
    ema = copy.deepcopy(model.unet)
    with torch.no_grad():
        for name, p in ema.named_parameters():
            if ".default" in name:
                p.mul_(0.5)
    state = L.kohya_lora_state(model.replace(ema_unet=ema), use_ema=True)
    raw = L.kohya_lora_state(model)
    key = next(k for k in raw if k.startswith("lora_unet_") and k.endswith("lora_up.weight"))
    assert torch.allclose(state[key], raw[key] * 0.5)
    te_key = next(k for k in raw if k.startswith("lora_te_"))
    assert torch.equal(state[te_key], raw[te_key])          # the text encoder has no EMA: raw weights
    with pytest.raises(FileNotFoundError):
        L.load_kohya_lora(str(tmp_path / "missing.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


@pytest.mark.skipif(not COMFYUI_DIR, reason="opt-in: set COMFYUI_DIR to a ComfyUI source tree (and COMFYUI_PYTHON "
                                            "to a Python that can import it, default: this one)")
@pytest.mark.parametrize("family,lora_type,unet_targets", [
    ("sd1", "lora", "transformer"), ("sd2", "lora", "transformer"), ("sdxl", "lora", "transformer"),
    ("sd1", "dora", "transformer"), ("sd1", "loha", "transformer"), ("sdxl", "lokr", "transformer"),
    ("sd1", "lora", "transformer+conv"), ("sdxl", "loha", "transformer+conv")])
def test_real_comfyui_loads_every_key_and_applies_the_trained_weights(bases, family, lora_type, unet_targets,
                                                                      tmp_path):
    from safetensors.torch import load_file, save_file

    from comfyui_dreambooth.training.models import save_single_file

    base = bases[family]
    model = _trained(base, lora_type, rank=4, alpha=3.0, unet_targets=unet_targets)
    checkpoint = save_single_file(base, str(tmp_path / "base.safetensors"), dtype="fp32")
    lora_path = L.save_kohya_lora(model, str(tmp_path / "lora.safetensors"), dtype="fp32")
    paths = _module_paths(model)
    base_weights = {name: _plain_weight(base, i, p).detach().contiguous() for name, (i, p) in paths.items()}
    save_file(base_weights, str(tmp_path / "base_weights.safetensors"))
    clip_names = {"sd1": ["clip_l"], "sd2": ["clip_h"], "sdxl": ["clip_l", "clip_g"]}[family]
    request = {"checkpoint": checkpoint, "lora": lora_path, "base_weights": str(tmp_path / "base_weights.safetensors"),
               "out": str(tmp_path / "applied.safetensors"),
               "clip": {n: te.config.num_hidden_layers for n, te in zip(clip_names, base.text_encoders)}}
    (tmp_path / "request.json").write_text(json.dumps(request))
    probe = os.path.join(os.path.dirname(__file__), "export_comfy_probe.py")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    run = subprocess.run([python, probe, COMFYUI_DIR, str(tmp_path / "request.json")], capture_output=True,
                         text=True, timeout=600, cwd=COMFYUI_DIR)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["not_loaded"] == []
    assert set(report["mapped_prefixes"]) == set(paths) and report["patches"] == len(paths)
    applied = load_file(request["out"])
    merged = A.merged_copy(model)
    for name, (index, path) in paths.items():
        expected = _plain_weight(merged, index, path)
        if lora_type == "dora":
            # ComfyUI 0.3.x divides an output-axis DoRA by the norm of the *base* weight (PR 15458 fixes it):
            # compare with that formula rather than with the DoRA definition.
            base_w = base_weights[name].float()
            norm = base_w.reshape(base_w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (base_w.dim() - 1))
            adapted = expected.float() * reference_norm(model, index, path) / norm
            assert torch.allclose(applied[name], adapted, atol=1e-4, rtol=1e-4), name
        else:
            assert torch.allclose(applied[name], expected.float(), atol=2e-5, rtol=1e-5), \
                (name, (applied[name] - expected).abs().max())


def reference_norm(model, index, path):
    """||W + dW|| per output channel of a DoRA layer: what peft (and the DoRA paper) normalise by."""
    module = model.unet if index == 0 else model.text_encoders[index - 1]
    layer = module.get_submodule(path)
    base = layer.get_base_layer().weight.float()
    lora_a, lora_b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    adapted = base + layer.scaling["default"] * (lora_b.flatten(1) @ lora_a.flatten(1)).reshape(base.shape)
    return adapted.reshape(base.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (base.dim() - 1))
