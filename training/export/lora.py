"""Kohya-format LoRA files (what A1111, Forge, ComfyUI's LoraLoader and diffusers' load_lora_weights read).

Keys: one prefix per adapted layer, `lora_unet_<diffusers module path, "." -> "_">` for the UNet and
`lora_te_<text_model path>` for the text encoder (SDXL: `lora_te1_` for CLIP-L, `lora_te2_` for OpenCLIP-G), then
  LoRA : .lora_down.weight (rank x in[,k,k]) / .lora_up.weight (out x rank[,1,1]) / .alpha
  DoRA : the LoRA keys + .dora_scale, the magnitude per output channel, shape (out, 1[,1,1]) (LyCORIS wd_on_output)
  LoHa : .hada_w1_a .hada_w1_b .hada_w2_a .hada_w2_b (+ .hada_t1 .hada_t2) / .alpha
  LoKr : .lokr_w1 or .lokr_w1_a/.lokr_w1_b, .lokr_w2 or .lokr_w2_a/.lokr_w2_b (+ .lokr_t2) / .alpha
Readers scale by alpha / rank, exactly as peft did during training, so `.alpha` is the training alpha (the A1111
extension writes a fixed 0.8 instead, which silently weakens its LoRAs). One exception, forced by the format: a LoKr
layer whose two factors are both full matrices has no rank, and every reader then uses scale 1, so peft's
alpha / rank is folded into lokr_w1.

Known reader limits (not ours to fix): diffusers drops `dora_scale` from kohya SD/SDXL files and cannot read LoHa or
LoKr; ComfyUI (0.3.x) normalises an output-axis DoRA by the norm of the base weight instead of the adapted weight,
a small difference while the adapter stays small (open upstream fix: Comfy-Org/ComfyUI PR 15458).

Metadata: kohya's `ss_*` training keys (from `model.metadata["training"]`, see `lora_metadata`), the
sd-webui-additional-networks hashes `sshs_model_hash` / `sshs_legacy_hash`, and ModelSpec 1.0.1 `modelspec.*` keys.
"""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import time

from ..models.components import SDModel
# shared with full-checkpoint saves (training/models/save.py), so both name architectures the same way
from ..models.identity import MODELSPEC_VERSION, default_resolution, modelspec_architecture  # noqa: F401
from ..setup.adapters import adapted_layers, adapter_config, ADAPTER_NAME
from .naming import safe_output_path, unique_path  # noqa: F401  (node-facing helpers live beside the writer)

SAVE_DTYPES = ("fp16", "bf16", "fp32")
NETWORK_MODULES = {"lora": "networks.lora", "dora": "lycoris.kohya", "loha": "lycoris.kohya", "lokr": "lycoris.kohya"}
# kohya's ss_base_model_version strings
_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


class NoAdaptersError(ValueError):
    """The model carries no LoRA/LyCORIS adapter (fully fine-tuned, or untrained)."""


def _torch_dtype(name: str):
    import torch

    if name not in SAVE_DTYPES:
        raise ValueError(f"dtype {name!r}: choose one of {', '.join(SAVE_DTYPES)}")
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ----------------------------------------------------------------------------------------------------------------
# Key names
# ----------------------------------------------------------------------------------------------------------------
def text_encoder_prefixes(model: SDModel) -> list[str]:
    """kohya prefix for each text encoder, in model order."""
    if model.family == "sdxl":
        return ["lora_te1", "lora_te2"]
    return ["lora_te"] + [f"lora_te{i + 2}" for i in range(len(model.text_encoders) - 1)]


def kohya_name(prefix: str, module_path: str) -> str:
    """`lora_unet_down_blocks_0_..._to_q` / `lora_te_text_model_encoder_layers_0_self_attn_q_proj`."""
    if prefix.startswith("lora_te") and not module_path.startswith("text_model."):
        # transformers 5's CLIPTextModel has no "text_model." level; every reader expects the original names
        module_path = "text_model." + module_path
    return f"{prefix}_{module_path.replace('.', '_')}"


# ----------------------------------------------------------------------------------------------------------------
# Tensors per layer
# ----------------------------------------------------------------------------------------------------------------
def _get(container, name=ADAPTER_NAME):
    """A peft per-adapter entry (ParameterDict value, or the weight of a ModuleDict layer), or None."""
    if container is None or name not in container:
        return None
    entry = container[name]
    return entry.weight if hasattr(entry, "weight") else entry


def _lora_tensors(layer) -> dict:
    down = _get(layer.lora_A)
    up = _get(layer.lora_B)
    alpha = float(layer.lora_alpha[ADAPTER_NAME])
    rank = int(layer.r[ADAPTER_NAME])
    if abs(float(layer.scaling[ADAPTER_NAME]) - alpha / rank) > 1e-9 * max(1.0, alpha / rank):
        raise ValueError("LoRA scaling is not alpha/rank (rsLoRA?); kohya files cannot express it")
    out = {"lora_down.weight": down, "lora_up.weight": up, "alpha": alpha}
    magnitude_layer = getattr(layer, "lora_magnitude_vector", None)
    if magnitude_layer is not None and ADAPTER_NAME in magnitude_layer:
        magnitude = magnitude_layer[ADAPTER_NAME].weight
        base = layer.get_base_layer().weight
        out["dora_scale"] = magnitude.reshape(base.shape[0], *([1] * (base.dim() - 1)))
    return out


def _loha_tensors(layer) -> dict:
    out = {f"hada_{k}": _get(getattr(layer, f"hada_{k}")) for k in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")}
    out = {k: v for k, v in out.items() if v is not None}
    out["alpha"] = float(layer.alpha[ADAPTER_NAME])
    return out


def _lokr_tensors(layer) -> dict:
    out = {f"lokr_{k}": _get(getattr(layer, f"lokr_{k}")) for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}
    out = {k: v for k, v in out.items() if v is not None}
    out["alpha"] = float(layer.alpha[ADAPTER_NAME])
    if "lokr_w1" in out and "lokr_w2" in out:
        # no factor is low-rank, so readers apply scale 1: fold peft's alpha / rank into w1
        out["lokr_w1"] = out["lokr_w1"] * float(layer.scaling[ADAPTER_NAME])
    return out


def _layer_tensors(layer) -> dict:
    if hasattr(layer, "lora_A"):
        return _lora_tensors(layer)
    if hasattr(layer, "hada_w1_a"):
        return _loha_tensors(layer)
    if hasattr(layer, "lokr_w1"):
        return _lokr_tensors(layer)
    raise TypeError(f"no kohya layout for adapter layer {type(layer).__name__}")


def kohya_lora_state(model: SDModel, *, use_ema: bool = False) -> dict:
    """{kohya key: float32 cpu tensor} for every adapted layer (alpha as a 0-d tensor)."""
    import torch

    unet = model.unet
    if use_ema:
        if model.ema_unet is None or not adapted_layers(model.ema_unet):
            raise ValueError("use_ema: this model has no EMA of its adapter weights (train with use_ema on)")
        unet = model.ema_unet
    parts = [("lora_unet", unet)] + list(zip(text_encoder_prefixes(model), model.text_encoders))
    state = {}
    for prefix, module in parts:
        for path, layer in adapted_layers(module).items():
            name = kohya_name(prefix, path)
            for suffix, value in _layer_tensors(layer).items():
                if isinstance(value, float):
                    tensor = torch.tensor(value, dtype=torch.float32)
                else:
                    tensor = value.detach().to("cpu", torch.float32, copy=True).contiguous()
                state[f"{name}.{suffix}"] = tensor
    if not state:
        raise NoAdaptersError("this model has no LoRA adapters (it was fully fine-tuned, or not trained with "
                              "use_lora): save it with SaveCheckpoint instead, or train with use_lora on")
    return state


# ----------------------------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------------------------
def base_model_version(model: SDModel) -> str:
    version = _BASE_MODEL_VERSION[model.family]
    if model.family != "sdxl" and model.prediction_type == "v_prediction":
        version += "_v"
    return version


def _resolution_text(value, model: SDModel) -> str:
    if value in (None, ""):
        value = default_resolution(model)
    if isinstance(value, (list, tuple)):
        width, height = (value[0], value[-1])
    elif isinstance(value, str) and "x" in value:
        return value
    elif isinstance(value, str) and "," in value:
        width, height = (int(v) for v in value.split(",")[:2])
    else:
        width = height = int(value)
    return f"{width}x{height}"


def _meta_value(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def modelspec_metadata(model: SDModel, *, title: str, adapter: str | None, training: dict,
                       timestamp: float) -> dict:
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(model, adapter),
        # kohya's choice: SDXL LoRAs and full checkpoints name Stability's reference code, SD1/2 LoRAs diffusers
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models"
                                     if model.family == "sdxl" or not adapter else "diffusers"),
        "modelspec.title": title,
        "modelspec.resolution": _resolution_text(training.get("resolution"), model),
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if model.prediction_type == "v_prediction" else "epsilon",
        "modelspec.implementation_version": "comfyui-dreambooth",
    }
    clip_skip = training.get("clip_skip")
    if isinstance(clip_skip, int) and clip_skip >= 1:       # 0 / None: the model's own default layer
        meta["modelspec.encoder_layer"] = str(clip_skip)
    if training.get("trigger_phrase"):
        meta["modelspec.trigger_phrase"] = _meta_value(training["trigger_phrase"])
    if training.get("description"):
        meta["modelspec.description"] = _meta_value(training["description"])
    return meta


# Our setting / run-fact names -> kohya's ss_* keys (train_network.py). Names kohya shares with us map to themselves.
_KOHYA_KEYS = {
    "learning_rate": ("ss_learning_rate", "ss_unet_lr"),    # our learning_rate is the UNet's
    "unet_lr": ("ss_unet_lr",),
    "text_encoder_lr": ("ss_text_encoder_lr",),
    "batch_size": ("ss_batch_size_per_device",),
    "offset_noise": ("ss_noise_offset",),
    "shuffle_tags": ("ss_shuffle_caption",),
    "random_flip": ("ss_flip_aug",),
    "bucketing": ("ss_enable_bucket",),
    "bucket_min_side": ("ss_min_bucket_reso",),
    "bucket_max_side": ("ss_max_bucket_reso",),
    "caption_dropout": ("ss_caption_dropout_rate",),
    **{name: (f"ss_{name}",) for name in (
        "lr_scheduler", "lr_warmup_steps", "max_train_steps", "gradient_accumulation_steps", "gradient_checkpointing",
        "mixed_precision", "optimizer", "max_grad_norm", "min_snr_gamma", "prior_loss_weight", "clip_skip", "seed",
        "zero_terminal_snr", "cache_latents", "resolution", "keep_tokens", "num_train_images", "num_reg_images",
        "num_batches_per_epoch", "num_epochs", "steps", "epoch", "training_started_at", "training_finished_at",
        "dataset_dirs", "reg_dataset_dirs", "tag_frequency", "bucket_info", "training_comment", "total_batch_size",
        "session_id", "max_token_length", "color_aug", "face_crop_aug_range", "random_crop", "noise_offset",
        "caption_dropout_rate", "loss_type")},
}


def _flatten_training(training: dict) -> dict:
    """The trainer's settings dict has the data settings nested under "data"; kohya keeps them flat."""
    flat = {k: v for k, v in training.items() if k != "data"}
    for key, value in (training.get("data") or {}).items():
        flat.setdefault(key, value)
    return flat


def lora_metadata(model: SDModel, *, title: str, training: dict | None = None,
                  timestamp: float | None = None) -> dict:
    """All string metadata of a LoRA file, except the two sshs_* hashes (they need the final tensors).

    `training` defaults to `model.metadata["training"]` (the trainer stores `DreamBoothSettings.result_dict()`
    there, plus any run facts it knows). Keys kohya has a name for become `ss_*` (learning_rate -> ss_learning_rate
    and ss_unet_lr, batch_size -> ss_batch_size_per_device, offset_noise -> ss_noise_offset, data.resolution ->
    ss_resolution, and kohya's own names: num_train_images, num_reg_images, training_started_at, steps, epoch,
    dataset_dirs (a dict, stored as JSON), ...). The whole dict is also kept as JSON in `dreambooth.training`.
    `trigger_phrase` and `description` go to modelspec.*.
    """
    cfg = adapter_config(model)
    if cfg is None:
        raise NoAdaptersError("this model has no LoRA adapters: nothing to describe")
    training = dict(model.metadata.get("training") or {}) if training is None else dict(training)
    flat = _flatten_training(training)
    timestamp = time.time() if timestamp is None else timestamp
    meta = {
        "ss_network_module": NETWORK_MODULES[cfg.lora_type],
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": _meta_value(cfg.alpha),
        "ss_network_dropout": _meta_value(cfg.dropout),
        "ss_base_model_version": base_model_version(model),
        "ss_v2": str(model.family == "sd2"),
        "ss_output_name": title,
        "ss_sd_model_name": os.path.basename(model.source.rstrip("/\\")) if model.source else "",
        "ss_training_started_at": _meta_value(flat.get("training_started_at", timestamp)),
    }
    if NETWORK_MODULES[cfg.lora_type] == "lycoris.kohya":
        network_args = {"algo": "lora" if cfg.lora_type == "dora" else cfg.lora_type}
        if cfg.lora_type == "dora":
            network_args.update({"dora_wd": "True", "wd_on_output": "True"})
        meta["ss_network_args"] = json.dumps(network_args, sort_keys=True)
    for key, value in flat.items():
        for name in _KOHYA_KEYS.get(key, ()):
            if value is not None or name not in meta:
                meta[name] = _meta_value(value)
    if training:
        meta["dreambooth.training"] = json.dumps(training, sort_keys=True, default=str)
    meta["dreambooth.adapter"] = json.dumps(cfg.to_dict(), sort_keys=True)
    if model.source_hash:
        meta["dreambooth.base_model_hash"] = model.source_hash
    meta.update(modelspec_metadata(model, title=title, adapter="lora", training=flat, timestamp=timestamp))
    return meta


def _sshs_hashes(state: dict, metadata: dict) -> tuple[str, str]:
    """sd-webui-additional-networks' model hashes: sha256 of the file body (after the header) when only the ss_*
    metadata is present, full and "legacy" (64 KiB at 1 MiB), as kohya precomputes them."""
    from safetensors.torch import save

    data = save(state, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    body = data[8 + header_len:]
    model_hash = hashlib.sha256(body).hexdigest()
    buffer = io.BytesIO(data)
    buffer.seek(0x100000)
    legacy = hashlib.sha256(buffer.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy


# ----------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------
def save_kohya_lora(model: SDModel, path: str, *, dtype: str = "fp16", use_ema: bool = False,
                    title: str | None = None, training: dict | None = None, metadata: dict | None = None) -> str:
    """Write the model's adapters as a kohya LoRA .safetensors file, atomically. Returns the path.

    Weights are stored in `dtype`; `.alpha` stays float32 so the training alpha survives exactly. An Imagic model
    also gets its embeddings beside the file (training/models/imagic_embeddings.py: save_sidecar).
    """
    from safetensors.torch import save_file

    from ..fsutil import atomic_path

    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"{path}: a LoRA is written as .safetensors")
    target = _torch_dtype(dtype)
    state = kohya_lora_state(model, use_ema=use_ema)
    state = {k: (v if k.endswith(".alpha") else v.to(target)).contiguous() for k, v in state.items()}
    title = title or os.path.splitext(os.path.basename(path))[0]
    meta = lora_metadata(model, title=title, training=training)
    meta.update({str(k): _meta_value(v) for k, v in (metadata or {}).items()})
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = _sshs_hashes(state, meta)
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=meta)
    from ..models.imagic_embeddings import save_sidecar

    save_sidecar(model, path)      # an Imagic model's embeddings: <name>.imagic.safetensors beside the LoRA
    return path


def load_kohya_lora(path: str) -> tuple[dict, dict]:
    """(state dict, metadata) of a LoRA .safetensors file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata() or {})
        state = {key: f.get_tensor(key) for key in f.keys()}
    return state, metadata


__all__ = ["SAVE_DTYPES", "NoAdaptersError", "kohya_name", "text_encoder_prefixes", "kohya_lora_state",
           "lora_metadata", "modelspec_metadata", "modelspec_architecture", "base_model_version",
           "save_kohya_lora", "load_kohya_lora", "safe_output_path", "unique_path"]
