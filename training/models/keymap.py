"""One key map between the original single-file layout ("LDM") and diffusers modules, used both ways.

Each rule says which LDM tensor(s) hold which diffusers tensor(s) and how:
  same       rename (a reshape may turn LDM's 1x1 convs into diffusers' linears; same bytes)
  transpose  OpenCLIP's text_projection is stored (width, proj), diffusers' Linear wants (proj, width)
  split3     OpenCLIP's fused attention in_proj = cat(q, k, v) along dim 0
Loading applies the rules forward, saving backward; since every rule is a pure re-arrangement, a
single-file → diffusers → single-file trip returns the same bytes.

Rules are generated from the diffusers module's own key list (so they always cover the module exactly),
translating each diffusers name to its LDM name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    kind: str                 # "same" | "transpose" | "split3"
    ldm: str                  # LDM key (full, with prefix)
    diffusers: tuple          # diffusers key(s) (without component prefix); 3 for split3


# --------------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------------
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet_part(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET[name]}.{tail}"


def unet_ldm_key(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """Diffusers UNet2DConditionModel key → LDM (openaimodel) key, without the 'model.diffusion_model.' prefix."""
    n = layers_per_block
    fixed = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "add_embedding.linear_1.": "label_emb.0.0.",
             "add_embedding.linear_2.": "label_emb.0.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for d, l in fixed.items():
        if key.startswith(d):
            return l + key[len(d):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"input_blocks.{1 + i * (n + 1) + j}.0.{_resnet_part(rest)}"
        if kind == "attentions":
            return f"input_blocks.{1 + i * (n + 1) + j}.1.{rest}"
        return f"input_blocks.{1 + i * (n + 1) + n}.0.op.{rest.removeprefix('conv.')}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{_resnet_part(rest)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"output_blocks.{i * (n + 1) + j}.0.{_resnet_part(rest)}"
        if kind == "attentions":
            return f"output_blocks.{i * (n + 1) + j}.1.{rest}"
        return f"output_blocks.{i * (n + 1) + n}.{2 if up_has_attention[i] else 1}.{rest}"
    raise KeyError(f"no LDM name known for UNet key {key!r}")


def unet_rules(unet_keys, config, prefix: str = "model.diffusion_model.") -> list[Rule]:
    n = config["layers_per_block"]
    if not isinstance(n, int):
        if len(set(n)) != 1:
            raise ValueError("UNets with a different layers_per_block per level have no single-file layout")
        n = n[0]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    return [Rule("same", prefix + unet_ldm_key(k, n, up_attn), (k,)) for k in unet_keys]


# --------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}


def vae_ldm_key(key: str, num_levels: int) -> str:
    """Diffusers AutoencoderKL key → LDM key, without the 'first_stage_model.' prefix."""
    m = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        side, _, i, kind, j, rest = m[1], m[2], int(m[3]), m[4], int(m[5]), m[6]
        level = i if side == "encoder" else num_levels - 1 - i    # LDM's decoder counts levels bottom-up
        group = "down" if side == "encoder" else "up"
        if kind == "resnets":
            name, _, tail = rest.partition(".")
            return f"{side}.{group}.{level}.block.{j}.{_VAE_RESNET.get(name, name)}.{tail}"
        return f"{side}.{group}.{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        side, kind, j, rest = m[1], m[2], int(m[3]), m[4]
        if kind == "resnets":
            name, _, tail = rest.partition(".")
            return f"{side}.mid.block_{j + 1}.{_VAE_RESNET.get(name, name)}.{tail}"
        for d, l in _VAE_ATTN.items():
            if rest.startswith(d + "."):
                return f"{side}.mid.attn_1.{l}.{rest[len(d) + 1:]}"
    m = re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", key)
    if m:
        return f"{m[1]}.norm_out.{m[2]}"
    if re.match(r"(encoder|decoder)\.(conv_in|conv_out)\.|(post_)?quant_conv\.", key):
        return key
    raise KeyError(f"no LDM name known for VAE key {key!r}")


def vae_rules(vae_keys, config, prefix: str = "first_stage_model.") -> list[Rule]:
    levels = len(config["block_out_channels"])
    return [Rule("same", prefix + vae_ldm_key(k, levels), (k,)) for k in vae_keys]


# --------------------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------------------
def hf_clip_rules(te_keys, prefix: str) -> list[Rule]:
    """OpenAI CLIP (SD1, SDXL's first encoder) is stored in transformers' own layout under a prefix."""
    return [Rule("same", prefix + k, (k,)) for k in te_keys if not k.endswith("position_ids")]


_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_rules(te_keys, prefix: str) -> list[Rule]:
    """OpenCLIP text towers (SD2, SDXL's second encoder): fused qkv, transposed projection."""
    rules, seen_qkv = [], set()
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    for k in te_keys:
        if k.endswith("position_ids"):
            continue
        if k in fixed:
            rules.append(Rule("same", prefix + fixed[k], (k,)))
            continue
        if k == "text_projection.weight":
            rules.append(Rule("transpose", prefix + "text_projection", (k,)))
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        if not m:
            raise KeyError(f"no OpenCLIP name known for text-encoder key {k!r}")
        i, mod, kind = m[1], m[2], m[3]
        layer = f"text_model.encoder.layers.{i}.self_attn"
        if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if (i, kind) not in seen_qkv:
                seen_qkv.add((i, kind))
                rules.append(Rule("split3", f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}",
                                  tuple(f"{layer}.{p}_proj.{kind}" for p in "qkv")))
            continue
        rules.append(Rule("same", f"{prefix}transformer.resblocks.{i}.{_OPENCLIP_LAYER[mod]}.{kind}", (k,)))
    return rules


# --------------------------------------------------------------------------------------------------
# Applying rules
# --------------------------------------------------------------------------------------------------
def to_diffusers(rule: Rule, tensor: torch.Tensor, shapes: dict) -> dict:
    """LDM tensor → {diffusers key: tensor}; views where possible (no copy of the weights)."""
    if rule.kind == "same":
        (k,) = rule.diffusers
        return {k: tensor.reshape(shapes[k]) if tuple(tensor.shape) != tuple(shapes[k]) else tensor}
    if rule.kind == "transpose":
        return {rule.diffusers[0]: tensor.t().contiguous()}
    if rule.kind == "split3":
        return dict(zip(rule.diffusers, tensor.chunk(3, dim=0)))
    raise ValueError(rule.kind)


def to_ldm(rule: Rule, tensors: list, ldm_shape=None) -> torch.Tensor:
    """Diffusers tensor(s) → the LDM tensor (exact inverse of `to_diffusers`)."""
    if rule.kind == "same":
        t = tensors[0]
        return t.reshape(ldm_shape) if ldm_shape is not None and tuple(t.shape) != tuple(ldm_shape) else t
    if rule.kind == "transpose":
        return tensors[0].t().contiguous()
    if rule.kind == "split3":
        import torch    # here only: load.py and save.py import this module, and `models` stays torch-free to import

        return torch.cat(tensors, dim=0)
    raise ValueError(rule.kind)


# ---- the rules of one module (loading and saving apply them in opposite directions) ----------------------------
def canonical_te_key(module_key: str) -> str:
    """transformers 5 dropped 'text_model.' from CLIPTextModel keys; rules use the prefixed form."""
    if module_key.startswith(("text_model.", "text_projection")):
        return module_key
    return "text_model." + module_key


def module_rules(component: str, module, config: dict, family: str, te_kind: str = "", prefix: str = ""):
    keys = list(module.state_dict().keys())
    if component == "unet":
        return unet_rules(keys, config), {k: k for k in keys}
    if component == "vae":
        return vae_rules(keys, config), {k: k for k in keys}
    canon = {canonical_te_key(k): k for k in keys}
    rules = hf_clip_rules(canon, prefix) if te_kind == "hf" else open_clip_rules(canon, prefix)
    return rules, canon
