"""peft adapters (LoRA, DoRA, LoHa, LoKr) on a model's UNet and CLIP text encoder(s).

`add_adapters` returns a *new* SDModel: the modules it wraps are deep copies, so the model it received (which
ComfyUI may have cached and handed to other nodes, possibly as inference tensors) is never touched. Modules it does
not wrap (VAE, tokenizers, an unadapted text encoder) are shared with the original.

Which layers get an adapter (the defaults are what kohya sd-scripts' `networks.lora` targets, the de-facto
standard LoRA layout that A1111, Forge and ComfyUI users expect):
  UNet, preset "transformer" (default): inside every Transformer2DModel the attention projections
      attn1/attn2 .to_q .to_k .to_v .to_out.0, the feed-forward ff.net.0.proj and ff.net.2, and proj_in / proj_out
      (1x1 convolutions on SD 1.x, linear layers on SD 2.x / SDXL).
  UNet, preset "attention": only the attention projections (what diffusers' DreamBooth-LoRA script trains:
      smaller files, a little less capacity).
  UNet, preset "transformer+conv": "transformer" plus every ResNet block's conv1 / conv2 / conv_shortcut /
      time_emb_proj and the down/upsampler convolutions: kohya's LoCon layout (LoRA-C3Lier with conv_dim = rank).
      The convolutions hold the UNet's spatial knowledge (shapes, patterns), which attention alone adapts slowly;
      it learns a subject's look in fewer steps (toy world: README), at about twice the file size.
  Text encoder, preset "attention+mlp" (default): self_attn.q_proj/k_proj/v_proj/out_proj and mlp.fc1/fc2 of every
      layer; preset "attention": only the four attention projections.
Every name these presets produce has a kohya key that ComfyUI's LoraLoader maps (tests/test_export_lora.py checks
the exact key set), so a saved LoRA loads with no unmatched keys.

Scaling is peft's (and kohya's): delta = alpha / rank * (low-rank product). For LoHa/LoKr the `dropout` setting is
peft's `rank_dropout` (those adapters have no input dropout).
Adapter weights are kept in float32 whatever the base dtype (low-precision adapter weights lose small updates).
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass

from ..models.components import SDModel

LORA_TYPES = ("lora", "dora", "loha", "lokr")
ADAPTER_NAME = "default"            # peft's adapter slot; one adapter per model
STATE_FORMAT = "comfyui-dreambooth-adapters/1"

_ATTENTION = r"attn[12]\.(?:to_q|to_k|to_v|to_out\.0)"
_LEVEL = r"(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\."
_TRANSFORMER_2D = _LEVEL + r"attentions\.\d+\."          # a Transformer2DModel
_TRANSFORMER = rf"{_TRANSFORMER_2D}(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:{_ATTENTION}|ff\.net\.0\.proj|ff\.net\.2))"
_CONV = (rf"(?:{_LEVEL}resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)"
         r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv)")
# Full module paths in a diffusers UNet2DConditionModel.
UNET_TARGET_PRESETS = {
    "attention": rf"{_TRANSFORMER_2D}transformer_blocks\.\d+\.{_ATTENTION}",
    "transformer": _TRANSFORMER,
    "transformer+conv": rf"(?:{_TRANSFORMER}|{_CONV})",
}
# Module paths relative to a CLIP text model's `[text_model.]encoder.layers.<i>.`
TEXT_ENCODER_TARGET_PRESETS = {
    "attention": r"self_attn\.(?:q_proj|k_proj|v_proj|out_proj)",
    "attention+mlp": r"(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])",
}
DEFAULT_UNET_TARGETS = "transformer"
DEFAULT_TEXT_ENCODER_TARGETS = "attention+mlp"

# transformers 5 dropped the "text_model." level from CLIPTextModel (CLIPTextModelWithProjection keeps it)
_TEXT_LAYER = r"(?:text_model\.)?encoder\.layers\.\d+\."


@dataclass
class AdapterConfig:
    """What was applied; stored in `SDModel.metadata["adapter"]` and in the resume state."""
    lora_type: str = "lora"
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    on_unet: bool = True
    on_text_encoder: bool = False
    unet_targets: str = DEFAULT_UNET_TARGETS
    text_encoder_targets: str = DEFAULT_TEXT_ENCODER_TARGETS
    seed: int = 0

    def validate(self) -> list[str]:
        problems = []
        if self.lora_type not in LORA_TYPES:
            problems.append(f"lora_type={self.lora_type!r}: choose one of {', '.join(LORA_TYPES)}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            problems.append(f"lora_rank={self.rank!r}: must be a whole number >= 1 (typical 4..128)")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            problems.append(f"lora_alpha={self.alpha!r}: must be > 0 (the usual choice is alpha = rank, "
                            f"or rank/2 for a gentler update)")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"lora_dropout={self.dropout!r}: must be in [0, 1)")
        if not (self.on_unet or self.on_text_encoder):
            problems.append("adapters on neither the UNet nor the text encoder: enable at least one")
        if self.unet_targets not in UNET_TARGET_PRESETS:
            problems.append(f"unet_targets={self.unet_targets!r}: choose one of {', '.join(UNET_TARGET_PRESETS)}")
        if self.text_encoder_targets not in TEXT_ENCODER_TARGET_PRESETS:
            problems.append(f"text_encoder_targets={self.text_encoder_targets!r}: choose one of "
                            f"{', '.join(TEXT_ENCODER_TARGET_PRESETS)}")
        return problems

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------------------------------------------
# Which modules
# ----------------------------------------------------------------------------------------------------------------
def _is_adaptable(module) -> bool:
    import torch.nn as nn

    return isinstance(module, (nn.Linear, nn.Conv2d))


def unet_target_names(unet, preset: str = DEFAULT_UNET_TARGETS) -> list[str]:
    """Full module paths in `unet` that the preset adapts (in module order)."""
    pattern = re.compile(UNET_TARGET_PRESETS[preset] + "$")
    return [name for name, module in unet.named_modules() if pattern.match(name) and _is_adaptable(module)]


def text_encoder_target_names(text_encoder, preset: str = DEFAULT_TEXT_ENCODER_TARGETS) -> list[str]:
    pattern = re.compile(_TEXT_LAYER + TEXT_ENCODER_TARGET_PRESETS[preset] + "$")
    return [name for name, module in text_encoder.named_modules() if pattern.match(name) and _is_adaptable(module)]


# ----------------------------------------------------------------------------------------------------------------
# Adding adapters
# ----------------------------------------------------------------------------------------------------------------
def _peft_config(cfg: AdapterConfig, targets: list[str]):
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if cfg.lora_type in ("lora", "dora"):
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          use_dora=cfg.lora_type == "dora", init_lora_weights=True)
    if cfg.lora_type == "loha":
        return LoHaConfig(r=cfg.rank, alpha=cfg.alpha, rank_dropout=cfg.dropout, target_modules=targets,
                          init_weights=True)
    return LoKrConfig(r=cfg.rank, alpha=cfg.alpha, rank_dropout=cfg.dropout, target_modules=targets,
                      init_weights=True)


def _is_adapter_param(name: str) -> bool:
    # peft keeps each adapter's tensors in ModuleDicts/ParameterDicts keyed by the adapter name
    return f".{ADAPTER_NAME}." in name or name.endswith(f".{ADAPTER_NAME}")


def _wrap(module, cfg: AdapterConfig, targets: list[str], what: str):
    """A deep copy of `module` with adapters on `targets`; base weights frozen, adapter weights trainable fp32."""
    import torch
    from peft import inject_adapter_in_model

    if not targets:
        raise ValueError(f"{what}: no layers match the {cfg.lora_type} target preset; is this a Stable Diffusion "
                         f"model (SD 1.x / 2.x / XL)?")
    # Outside inference mode the copy holds normal tensors, even when ComfyUI loaded the model as inference tensors
    # (those cannot take part in autograd).
    with torch.inference_mode(False), torch.no_grad():
        wrapped = copy.deepcopy(module)
        wrapped.requires_grad_(False)
        inject_adapter_in_model(_peft_config(cfg, targets), wrapped, adapter_name=ADAPTER_NAME)
        for name, param in wrapped.named_parameters():
            if _is_adapter_param(name):
                param.data = param.data.float()
                param.requires_grad_(True)
            else:
                param.requires_grad_(False)
    return wrapped


def add_adapters(model: SDModel, *, rank: int = 4, alpha: float | None = None, dropout: float = 0.0,
                 lora_type: str = "lora", on_unet: bool = True, on_text_encoder: bool = False, seed: int = 0,
                 unet_targets: str = DEFAULT_UNET_TARGETS,
                 text_encoder_targets: str = DEFAULT_TEXT_ENCODER_TARGETS) -> SDModel:
    """A new SDModel whose UNet and/or text encoder(s) are copies carrying a fresh adapter.

    alpha=None means alpha = rank (scale 1). The adapter starts as a no-op (the up/second factor is zero), so the
    new model's outputs equal the original's until training moves it. `seed` makes the initialisation repeatable
    without touching the global RNG.
    """
    import torch

    if has_adapters(model):
        raise ValueError("this model already carries adapters; merge them first (merged_copy) or start from the "
                         "base model")
    cfg = AdapterConfig(lora_type=lora_type, rank=rank, alpha=float(rank if alpha is None else alpha),
                        dropout=float(dropout), on_unet=bool(on_unet), on_text_encoder=bool(on_text_encoder),
                        unet_targets=unet_targets, text_encoder_targets=text_encoder_targets, seed=int(seed))
    problems = cfg.validate()
    if problems:
        raise ValueError("adapter settings: " + "; ".join(problems))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet = model.unet
        if cfg.on_unet:
            unet = _wrap(model.unet, cfg, unet_target_names(model.unet, cfg.unet_targets), "UNet")
        text_encoders = list(model.text_encoders)
        if cfg.on_text_encoder:
            text_encoders = [
                _wrap(te, cfg, text_encoder_target_names(te, cfg.text_encoder_targets), f"text encoder {i + 1}")
                for i, te in enumerate(model.text_encoders)]
    metadata = dict(model.metadata)
    metadata["adapter"] = cfg.to_dict()
    return model.replace(unet=unet, text_encoders=text_encoders, metadata=metadata)


# ----------------------------------------------------------------------------------------------------------------
# Inspecting
# ----------------------------------------------------------------------------------------------------------------
def _tuner_layers(module):
    """(name, layer) for every peft-wrapped layer in `module`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if module is None:
        return []
    return [(name, sub) for name, sub in module.named_modules() if isinstance(sub, BaseTunerLayer)]


def _components(model: SDModel) -> dict:
    """Adapter-carrying module slots by the key used in state dicts: unet, text_encoder, text_encoder_2, ema_unet."""
    parts = {"unet": model.unet}
    for i, te in enumerate(model.text_encoders):
        parts["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = te
    if model.ema_unet is not None:
        parts["ema_unet"] = model.ema_unet
    return parts


def has_adapters(model: SDModel) -> bool:
    return any(_tuner_layers(module) for module in _components(model).values())


def adapter_config(model: SDModel) -> AdapterConfig | None:
    """The settings the model's adapters were created with (None for a model without adapters)."""
    data = model.metadata.get("adapter")
    if data is None or not has_adapters(model):
        return None
    return AdapterConfig.from_dict(data)


def adapted_layers(module) -> dict:
    """{module path: peft layer} for one UNet or text encoder (empty when it has no adapter)."""
    return dict(_tuner_layers(module))


def adapter_parameters(model: SDModel, *, unet: bool = True, text_encoders: bool = True) -> list:
    """The trainable adapter tensors (for the optimizer); the UNet's and/or the text encoders'."""
    modules = ([model.unet] if unet else []) + (list(model.text_encoders) if text_encoders else [])
    return [p for m in modules for name, p in m.named_parameters() if _is_adapter_param(name)]


# ----------------------------------------------------------------------------------------------------------------
# Resume state
# ----------------------------------------------------------------------------------------------------------------
def adapter_state(model: SDModel) -> dict:
    """Everything needed to rebuild the adapters exactly: {"format", "config", "tensors": {"<part>.<param>": cpu}}.

    `tensors` is flat, so `safetensors.torch.save_file(state["tensors"], path, {"config": json.dumps(...)})` works.
    """
    cfg = adapter_config(model)
    if cfg is None:
        raise ValueError("this model has no adapters (nothing to save for resume)")
    tensors = {}
    for part, module in _components(model).items():
        if not _tuner_layers(module):
            continue
        for name, param in module.named_parameters():
            if _is_adapter_param(name):
                tensors[f"{part}.{name}"] = param.detach().to("cpu", copy=True).contiguous()
    return {"format": STATE_FORMAT, "config": cfg.to_dict(), "tensors": tensors}


def adapter_state_metadata(state: dict) -> dict:
    """String metadata for a safetensors file holding `state["tensors"]` (read back by `state_from_file_parts`)."""
    return {"format": state["format"], "config": json.dumps(state["config"], sort_keys=True)}


def state_from_file_parts(tensors: dict, metadata: dict) -> dict:
    if metadata.get("format") != STATE_FORMAT:
        raise ValueError(f"not an adapter state (format {metadata.get('format')!r}, expected {STATE_FORMAT})")
    return {"format": STATE_FORMAT, "config": json.loads(metadata["config"]), "tensors": dict(tensors)}


def load_adapter_state(model: SDModel, state: dict) -> SDModel:
    """Model carrying the adapters recorded in `state`, with their exact values.

    A model without adapters gets new ones first (on copies, see add_adapters). A model that already has
    adapters with the same settings has its adapter tensors overwritten in place: that is the trainer's own
    copy being resumed.
    """
    import torch

    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"not an adapter state (format {state.get('format')!r}, expected {STATE_FORMAT})")
    saved = AdapterConfig.from_dict(state["config"])
    current = adapter_config(model)
    if current is None:
        if has_adapters(model):
            raise ValueError("the model carries adapters of unknown settings; cannot load an adapter state into it")
        model = add_adapters(model, rank=saved.rank, alpha=saved.alpha, dropout=saved.dropout,
                             lora_type=saved.lora_type, on_unet=saved.on_unet, on_text_encoder=saved.on_text_encoder,
                             seed=saved.seed, unet_targets=saved.unet_targets,
                             text_encoder_targets=saved.text_encoder_targets)
        if any(key.startswith("ema_unet.") for key in state["tensors"]):
            # an EMA of the adapter weights: same layout as the adapted UNet
            with torch.inference_mode(False), torch.no_grad():
                model = model.replace(ema_unet=copy.deepcopy(model.unet))
    else:
        differences = [f"{k}: model {v!r} vs state {getattr(saved, k)!r}" for k, v in current.to_dict().items()
                       if k not in ("seed", "dropout") and getattr(saved, k) != v]
        if differences:
            raise ValueError("the adapter state was saved with other settings: " + "; ".join(differences))

    by_part: dict[str, dict] = {}
    for key, tensor in state["tensors"].items():
        part, _, name = key.partition(".")
        by_part.setdefault(part, {})[name] = tensor
    components = _components(model)
    for part, tensors in by_part.items():
        module = components.get(part)
        if module is None:
            raise ValueError(f"the adapter state has weights for {part!r}, which this model lacks")
        params = {n: p for n, p in module.named_parameters() if _is_adapter_param(n)}
        unknown = sorted(set(tensors) - set(params))
        missing = sorted(set(params) - set(tensors))
        if unknown or missing:
            raise ValueError(f"adapter state does not fit the {part}: {len(unknown)} unknown tensors "
                             f"{unknown[:3]}, {len(missing)} missing {missing[:3]}")
        with torch.inference_mode(False), torch.no_grad():
            for name, tensor in tensors.items():
                target = params[name]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"{part}.{name}: shape {tuple(tensor.shape)} in the state, "
                                     f"{tuple(target.shape)} in the model")
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    return model


# ----------------------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------------------
def _set_submodule(root, path: str, new) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


def merged_module(module):
    """A copy of `module` with every adapter folded into its base weights and the peft wrappers removed."""
    import torch

    if not _tuner_layers(module):
        return module
    with torch.inference_mode(False), torch.no_grad():
        merged = copy.deepcopy(module)
        for name, layer in _tuner_layers(merged):
            base = layer.get_base_layer()
            target_dtype = base.weight.dtype
            if target_dtype in (torch.float16, torch.bfloat16):
                # fold in fp32: small adapter deltas vanish when added in half precision
                base.float()
                layer.merge(adapter_names=[ADAPTER_NAME])
                base.to(target_dtype)
            else:
                layer.merge(adapter_names=[ADAPTER_NAME])
            _set_submodule(merged, name, base)
        merged.requires_grad_(False)
    return merged


def merged_copy(model: SDModel) -> SDModel:
    """A model whose adapters are merged into plain weights (what SaveCheckpoint writes). The input is unchanged."""
    if not has_adapters(model):
        return model
    metadata = dict(model.metadata)
    adapter = metadata.pop("adapter", None)
    if adapter is not None:
        metadata["merged_adapter"] = adapter
    return model.replace(unet=merged_module(model.unet),
                         text_encoders=[merged_module(te) for te in model.text_encoders],
                         ema_unet=merged_module(model.ema_unet) if model.ema_unet is not None else None,
                         metadata=metadata)


__all__ = [
    "LORA_TYPES", "UNET_TARGET_PRESETS", "TEXT_ENCODER_TARGET_PRESETS", "DEFAULT_UNET_TARGETS",
    "DEFAULT_TEXT_ENCODER_TARGETS", "AdapterConfig", "add_adapters", "adapter_state", "load_adapter_state",
    "adapter_state_metadata", "state_from_file_parts", "merged_copy", "merged_module", "has_adapters",
    "adapter_config", "adapted_layers", "adapter_parameters", "unet_target_names", "text_encoder_target_names",
]
