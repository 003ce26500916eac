"""Family detection and hyper-parameter inference from a single-file checkpoint's keys and tensor shapes.

Only shapes are read (a dict key → shape), so this runs on a lazily opened file before any weight is loaded.
Everything structural is inferred (channels, levels, blocks per level, attention placement, transformer
depth, encoder widths and depths), which is what makes pruned, merged and tiny models load. What shapes
cannot tell (attention head counts, activation) follows each family's convention, unless the file carries
our own config in its metadata (which our saver writes).
"""
from __future__ import annotations

import re

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer."        # + "text_model." (older files omit it)
SD2_TE_PREFIX = "cond_stage_model.model."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."

FLAG_KEYS = ("v_pred", "ztsnr")    # empty marker tensors ComfyUI writes/reads for v-prediction / zero-SNR models


class NotStableDiffusionError(ValueError):
    pass


def _top_prefixes(keys, n=6) -> str:
    counts: dict[str, int] = {}
    for k in keys:
        p = ".".join(k.split(".")[:2])
        counts[p] = counts.get(p, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{p}.* ({c})" for p, c in top) or "no tensors at all"


def detect_family(shapes: dict) -> str:
    """'sd1' | 'sd2' | 'sdxl' from the key layout; a clear error for anything else."""
    keys = shapes.keys()
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if any(k.startswith(SDXL_TE2_PREFIX) for k in keys) or f"{UNET_PREFIX}label_emb.0.0.weight" in shapes:
        if not any(k.startswith(SDXL_TE1_PREFIX) for k in keys):
            raise NotStableDiffusionError(
                "this looks like an SDXL refiner or a UNet-only SDXL file (no first text encoder "
                "'conditioner.embedders.0.*'); only SDXL base checkpoints are supported")
        return "sdxl"
    if has_unet and any(k.startswith(SD2_TE_PREFIX) for k in keys):
        return "sd2"
    if has_unet and any(k.startswith(SD1_TE_PREFIX) for k in keys):
        return "sd1"
    what = "a UNet without a text encoder" if has_unet else _top_prefixes(keys)
    raise NotStableDiffusionError(
        "not a Stable Diffusion checkpoint (SD1.x, SD2.x or SDXL base in the original single-file layout, "
        f"expected 'model.diffusion_model.*' + 'first_stage_model.*' + a text encoder); found {what}. "
        "LoRA, VAE-only, embedding or other-architecture files cannot be loaded as a base model")


def _indices(shapes, pattern) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in shapes for m in [rx.match(k)] if m})


def infer_unet_config(shapes: dict, family: str) -> dict:
    """Diffusers UNet2DConditionModel kwargs from LDM UNet shapes."""
    p = UNET_PREFIX
    conv_in = shapes[p + "input_blocks.0.0.weight"]
    model_channels, in_channels = conv_in[0], conv_in[1]
    blocks = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")
    levels: list[dict] = [{"res": 0, "attn": False, "depth": 0, "ch": model_channels}]
    for b in blocks[1:]:
        bp = f"{p}input_blocks.{b}."
        if bp + "0.op.weight" in shapes:           # downsampler closes a level
            levels.append({"res": 0, "attn": False, "depth": 0, "ch": None})
            continue
        lvl = levels[-1]
        lvl["res"] += 1
        lvl["ch"] = shapes[bp + "0.out_layers.3.weight"][0]
        depth = len(_indices(shapes, re.escape(bp) + r"1\.transformer_blocks\.(\d+)\."))
        if depth:
            lvl["attn"], lvl["depth"] = True, depth
    layers_per_block = levels[0]["res"]
    if any(lvl["res"] != layers_per_block for lvl in levels):
        raise NotStableDiffusionError("UNet levels have different numbers of res blocks; not an SD layout")

    attn_key = next((k for k in shapes if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    if attn_key is None:
        raise NotStableDiffusionError("UNet has no cross-attention layers; not a text-to-image SD UNet")
    cross_attention_dim = shapes[attn_key][1]
    proj_in = next(k for k in shapes if k.startswith(p) and k.endswith("proj_in.weight"))
    channels = tuple(lvl["ch"] for lvl in levels)
    # the heads are not in the weights: SD1 uses 8 heads everywhere, SD2/SDXL 64-channel heads
    heads = 8 if family == "sd1" else tuple(max(1, c // 64) for c in channels)
    down_types = tuple("CrossAttnDownBlock2D" if lvl["attn"] else "DownBlock2D" for lvl in levels)
    up_types = tuple("CrossAttnUpBlock2D" if lvl["attn"] else "UpBlock2D" for lvl in reversed(levels))
    depths = [max(lvl["depth"], 1) for lvl in levels]
    # diffusers' mid block reads the last level's depth; that value is unused by a level without attention
    mid_depth = len(_indices(shapes, re.escape(p) + r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if mid_depth and mid_depth != depths[-1]:
        if levels[-1]["attn"]:
            raise NotStableDiffusionError(f"UNet mid block has {mid_depth} transformer layers but the last level "
                                          f"{depths[-1]}; no diffusers layout expresses that")
        depths[-1] = mid_depth
    depths = tuple(depths)
    up_depths = _up_transformer_depths(shapes, len(levels), layers_per_block)
    expected_up = tuple(reversed(depths))
    up_differs = any(u is not None and u != e for u, e in zip(up_depths, expected_up))
    cfg = dict(
        sample_size={"sd1": 64, "sd2": 96, "sdxl": 128}[family],
        in_channels=in_channels, out_channels=shapes[p + "out.2.weight"][0],
        layers_per_block=layers_per_block, block_out_channels=channels,
        down_block_types=down_types, up_block_types=up_types,
        cross_attention_dim=cross_attention_dim, attention_head_dim=heads,
        use_linear_projection=len(shapes[proj_in]) == 2,
        transformer_layers_per_block=depths if any(d != 1 for d in depths) else 1,
        norm_num_groups=32,
    )
    if up_differs:
        cfg["reverse_transformer_layers_per_block"] = tuple(
            tuple([u or e] * (layers_per_block + 1)) for u, e in zip(up_depths, expected_up))
    if family == "sd2":
        cfg["upcast_attention"] = True
    if p + "label_emb.0.0.weight" in shapes:
        cfg.update(addition_embed_type="text_time",
                   projection_class_embeddings_input_dim=shapes[p + "label_emb.0.0.weight"][1])
    return cfg


def _up_transformer_depths(shapes, num_levels, layers_per_block) -> tuple:
    p = UNET_PREFIX
    out = []
    for i in range(num_levels):
        bp = f"{p}output_blocks.{i * (layers_per_block + 1)}.1."
        out.append(len(_indices(shapes, re.escape(bp) + r"transformer_blocks\.(\d+)\.")) or None)
    return tuple(out)


def infer_vae_config(shapes: dict, family: str) -> dict:
    p = VAE_PREFIX
    levels = _indices(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    channels = tuple(shapes[f"{p}encoder.down.{i}.block.0.conv1.weight"][0] for i in levels)
    res = len(_indices(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."))
    return dict(
        in_channels=shapes[p + "encoder.conv_in.weight"][1], out_channels=shapes[p + "decoder.conv_out.weight"][0],
        latent_channels=shapes[p + "post_quant_conv.weight"][0], block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=res, norm_num_groups=32, sample_size={"sd1": 512, "sd2": 768, "sdxl": 1024}[family],
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    )


def infer_hf_clip_config(shapes: dict, prefix: str) -> dict:
    """transformers CLIPTextConfig kwargs for an OpenAI CLIP text model stored in HF layout."""
    tm = prefix + "text_model."
    tok = shapes[tm + "embeddings.token_embedding.weight"]
    hidden = tok[1]
    return dict(vocab_size=tok[0], hidden_size=hidden,
                intermediate_size=shapes[tm + "encoder.layers.0.mlp.fc1.weight"][0],
                num_hidden_layers=len(_indices(shapes, re.escape(tm) + r"encoder\.layers\.(\d+)\.")),
                num_attention_heads=max(1, hidden // 64),
                max_position_embeddings=shapes[tm + "embeddings.position_embedding.weight"][0],
                hidden_act="quick_gelu", projection_dim=hidden,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def infer_open_clip_config(shapes: dict, prefix: str) -> dict:
    tok = shapes[prefix + "token_embedding.weight"]
    hidden = tok[1]
    proj = shapes.get(prefix + "text_projection")
    return dict(vocab_size=tok[0], hidden_size=hidden,
                intermediate_size=shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0],
                num_hidden_layers=len(_indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")),
                num_attention_heads=max(1, hidden // 64),
                max_position_embeddings=shapes[prefix + "positional_embedding"][0],
                hidden_act="gelu", projection_dim=proj[1] if proj else hidden,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=0)


def text_encoder_prefixes(family: str, shapes: dict) -> list[tuple[str, str]]:
    """[(kind, prefix)] for each text encoder: kind 'hf' (OpenAI CLIP in transformers layout) or 'openclip'."""
    if family == "sd1":
        return [("hf", SD1_TE_PREFIX)]
    if family == "sd2":
        return [("openclip", SD2_TE_PREFIX)]
    return [("hf", SDXL_TE1_PREFIX), ("openclip", SDXL_TE2_PREFIX)]


def normalize_sd1_text_keys(shapes: dict) -> dict[str, str]:
    """Old SD1 files store CLIP as 'cond_stage_model.transformer.encoder...' (no 'text_model.'): rename map."""
    renames = {}
    for k in shapes:
        if k.startswith(SD1_TE_PREFIX) and not k.startswith(SD1_TE_PREFIX + "text_model."):
            renames[k] = SD1_TE_PREFIX + "text_model." + k[len(SD1_TE_PREFIX):]
    return renames
