"""A finished (or stopped) run back onto its base model, after a restart: what LoadTrained and `comfyui-dreambooth
sample --lora` do, so a run can be sampled, validated or exported again.

`load_trained(base, path, which)` takes
- a LoRA file written by this pack (SaveLoRA: kohya keys, with `dreambooth.adapter` metadata naming the adapter's
  type, rank, alpha and targets), with its Imagic sidecar (`<name>.imagic.safetensors`) when there is one: the
  adapters are rebuilt on copies of the base and given the file's tensors exactly (kohya's layout inverted);
- a run folder: its final state (which = last; the newest checkpoint when the run did not finish) or keep_best's
  best checkpoint (which = best); or one checkpoint folder (checkpoints/step-N, final): the run's settings
  (config.json) rebuild the trained modules, the checkpoint's tensors (and EMA) fill them.
A full checkpoint file (SaveCheckpoint's) needs no base: load it with LoadBaseModel.
"""
from __future__ import annotations

import json
import os

WHICH = ("last", "best")


def load_trained(base, path: str, which: str = "last"):
    """`base` (an SDModel, not changed) carrying the trained weights at `path`; see the module docstring."""
    if which not in WHICH:
        raise ValueError(f"which = {which!r}: choose 'last' or 'best'")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        return _from_run(base, path, which)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such LoRA file, run folder or checkpoint folder")
    if not path.lower().endswith(".safetensors"):
        raise ValueError(f"{path}: give a LoRA .safetensors file, a run folder or a checkpoint folder")
    if which == "best":
        raise ValueError(f"{path}: which = best chooses among a run's checkpoints; give the run folder, or which = "
                         "last for a LoRA file")
    return _from_lora(base, path)


# ---- a run or checkpoint folder ---------------------------------------------------------------------------------
def checkpoint_of(path: str, which: str = "last") -> tuple[str, dict]:
    """(checkpoint folder, the run's config.json) for a run folder (final / newest checkpoint / best) or a
    checkpoint folder."""
    from .runs import RunFolder

    if os.path.exists(os.path.join(path, "state.json")):            # checkpoints/step-N or final
        parent = os.path.dirname(path)
        run = RunFolder(os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent)
        cfg = run.read_config()
        if not cfg:
            raise ValueError(f"{path}: a checkpoint outside its run folder (no config.json beside it); LoadTrained "
                             "needs the run's settings")
        return path, cfg
    run = RunFolder(path)
    cfg = run.read_config()
    if not cfg:
        raise ValueError(f"{path}: not a run folder (no config.json) nor a checkpoint folder (no state.json)")
    if which == "best":
        best = cfg.get("best")
        if not best:
            raise ValueError(f"{path}: this run chose no best checkpoint (trained without keep_best); use which = "
                             "last or name one of its checkpoints")
        folder = best["checkpoint"]
        if not os.path.exists(os.path.join(folder, "state.json")):
            raise FileNotFoundError(f"{path}: its best checkpoint {folder} is gone; use which = last")
        return folder, cfg
    if cfg.get("finished") and os.path.isdir(run.final_dir):
        return run.final_dir, cfg
    latest = run.latest_checkpoint()
    if latest is None:
        raise ValueError(f"{path}: the run has neither a final state nor a checkpoint yet")
    return latest, cfg


def _from_run(base, path: str, which: str):
    from .checkpoints import load_weights
    from .settings import DreamBoothSettings
    from .setup.trainable import build_trainable, finish_model, named_trainables

    folder, cfg = checkpoint_of(path, which)
    trained_on = (cfg.get("base_model") or {}).get("hash")
    if trained_on and base.source_hash and trained_on != base.source_hash:
        raise ValueError(f"{path}: this run trained on another base model ({(cfg.get('base_model') or {}).get('path')}"
                         f", hash {trained_on}) than the one given (hash {base.source_hash}); load that base model")
    settings = DreamBoothSettings.from_dict(cfg["settings"])
    if settings.train_imagic_only:
        raise ValueError(f"{path}: an Imagic run; load the LoRA SaveLoRA wrote for it (with its .imagic sidecar)")
    tm, unet_params, te_params = build_trainable(base, settings)
    named = named_trainables(tm, unet_params, te_params)
    ema_state = load_weights(folder, named)
    model = finish_model(tm, base, named, settings, ema_state, cfg.get("run_id", ""))
    metadata = {**model.metadata, "loaded_from": folder}
    if cfg.get("best"):
        metadata["best_checkpoint"] = cfg["best"]
    return model.replace(metadata=metadata)


# ---- a LoRA file ----------------------------------------------------------------------------------------------
def _from_lora(base, path: str):
    import torch

    from .export.lora import kohya_name, load_kohya_lora, text_encoder_prefixes
    from .models.imagic_embeddings import load_sidecar, sidecar_path, with_imagic
    from .setup.adapters import AdapterConfig, adapted_layers, add_adapters

    tensors, meta = load_kohya_lora(path)
    if "dreambooth.adapter" not in meta:
        raise ValueError(f"{path}: this LoRA was not written by this pack (no dreambooth.adapter metadata), so its "
                         "adapter settings are unknown; load it with ComfyUI's LoraLoader instead")
    cfg = AdapterConfig.from_dict(json.loads(meta["dreambooth.adapter"]))
    with torch.inference_mode(False):
        model = add_adapters(base, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, lora_type=cfg.lora_type,
                             on_unet=cfg.on_unet, on_text_encoder=cfg.on_text_encoder, seed=cfg.seed,
                             unet_targets=cfg.unet_targets, text_encoder_targets=cfg.text_encoder_targets)
        parts = [("lora_unet", model.unet)] + list(zip(text_encoder_prefixes(model), model.text_encoders))
        used = set()
        for prefix, module in parts:
            for module_path, layer in adapted_layers(module).items():
                name = kohya_name(prefix, module_path)
                found = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
                if not found:
                    raise ValueError(f"{path}: no weights for {name}; the file does not fit this base model")
                _fill_layer(layer, found)
                used.update(f"{name}.{k}" for k in found)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"{path}: {len(unused)} tensors fit no layer of this base model (e.g. {unused[:2]}); load "
                         "the base it was trained on")
    for m in (model.unet, *model.text_encoders):
        m.eval().requires_grad_(False)
    metadata = {**model.metadata, "loaded_from": path}
    if meta.get("dreambooth.training"):
        metadata["training"] = json.loads(meta["dreambooth.training"])
    model = model.replace(metadata=metadata)
    if os.path.exists(sidecar_path(path)):
        model = with_imagic(model, load_sidecar(path))
    return model


def _fill_layer(layer, found: dict) -> None:
    """One peft layer's tensors from its kohya tensors (export/lora.py's layout inverted)."""
    import torch

    from .setup.adapters import ADAPTER_NAME

    def put(container, value):
        entry = container[ADAPTER_NAME]
        target = entry.weight if hasattr(entry, "weight") else entry
        with torch.no_grad():
            target.copy_(value.reshape(target.shape).to(device=target.device, dtype=target.dtype))

    if hasattr(layer, "lora_A"):
        put(layer.lora_A, found["lora_down.weight"])
        put(layer.lora_B, found["lora_up.weight"])
        if "dora_scale" in found:
            put(layer.lora_magnitude_vector, found["dora_scale"])
        return
    for key, value in found.items():
        if key == "alpha":
            continue
        container = getattr(layer, key)
        if key == "lokr_w1" and "lokr_w2" in found:          # the writer folded alpha / rank into a full w1
            value = value / float(layer.scaling[ADAPTER_NAME])
        put(container, value)


__all__ = ["WHICH", "load_trained", "checkpoint_of"]
