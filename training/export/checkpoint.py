"""Full-model exports: a single checkpoint file, or a diffusers folder.

Both write plain weights: a model that carries adapters is merged first, on a copy (the model received is never
changed), so the file loads anywhere a normal checkpoint does. The writers themselves (key layout, dtype, atomic
write) are `training.models.save_single_file` / `save_diffusers`.
"""
from __future__ import annotations

import time

from ..models.components import SDModel
from ..setup.adapters import adapter_config, has_adapters, merged_copy
from .lora import SAVE_DTYPES, modelspec_metadata

CHECKPOINT_FORMATS = ("safetensors", "ckpt")


def _check_common(model: SDModel, dtype: str, use_ema: bool) -> None:
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(SAVE_DTYPES)}")
    if use_ema and model.ema_unet is None:
        raise ValueError("use_ema is on but this model has no EMA weights: train with use_ema on, or turn use_ema "
                         "off to save the raw trained weights")


def checkpoint_metadata(model: SDModel, *, title: str, training: dict | None = None) -> dict:
    """modelspec.* keys for a full checkpoint, plus what was merged into it."""
    training = dict(model.metadata.get("training") or {}) if training is None else dict(training)
    meta = modelspec_metadata(model, title=title, adapter=None, training=training, timestamp=time.time())
    cfg = adapter_config(model)
    if cfg is not None:
        meta["dreambooth.merged_adapter"] = (f"{cfg.lora_type} rank {cfg.rank} alpha {cfg.alpha:g} "
                                             f"(unet={cfg.on_unet}, text_encoder={cfg.on_text_encoder})")
    if model.source_hash:
        meta["dreambooth.base_model_hash"] = model.source_hash
    return meta


def plain_model(model: SDModel) -> SDModel:
    """`model` itself when it has no adapters, else a copy with the adapters merged into its weights."""
    return merged_copy(model) if has_adapters(model) else model


def export_checkpoint(model: SDModel, path: str, *, dtype: str = "fp16", use_ema: bool = False,
                      title: str | None = None, metadata: dict | None = None) -> str:
    """Write one .safetensors / .ckpt file in the original (LDM) layout; adapters merged in. Returns the path."""
    import os

    from ..models import save_single_file

    _check_common(model, dtype, use_ema)
    title = title or os.path.splitext(os.path.basename(path))[0]
    meta = checkpoint_metadata(model, title=title)
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return save_single_file(plain_model(model), path, dtype=dtype, use_ema=use_ema, metadata=meta)


def export_diffusers(model: SDModel, folder: str, *, dtype: str = "fp16", use_ema: bool = False) -> str:
    """Write a diffusers pipeline folder (from_pretrained loads it); adapters merged in. Returns the folder."""
    from ..models import save_diffusers

    _check_common(model, dtype, use_ema)
    return save_diffusers(plain_model(model), folder, dtype=dtype, use_ema=use_ema)


__all__ = ["CHECKPOINT_FORMATS", "export_checkpoint", "export_diffusers", "checkpoint_metadata", "plain_model"]
