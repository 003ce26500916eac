"""Save Stable Diffusion models: a single file in the original layout (the key map of keymap.py applied backwards)
or a diffusers folder, atomically, with the architecture config stored in the file's metadata.
"""
from __future__ import annotations

import json
import os
import re

from . import detect, identity
from .components import SD_NOISE_SCHEDULE, SDModel
from .keymap import module_rules
from .state_dict import CONFIG_METADATA_KEY, DTYPES, KEEP_DTYPE, SINGLE_FILE_EXTS, torch_dtype


def _module_config(module) -> dict:
    cfg = dict(module.config) if not hasattr(module.config, "to_diff_dict") else module.config.to_dict()
    drop = {"architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype", "id2label",
            "label2id", "_commit_hash", "output_hidden_states", "return_dict", "model_type", "problem_type",
            "_attn_implementation_autoset", "use_return_dict"}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()
            if not k.startswith("_") and k not in drop}


def model_config_metadata(model: SDModel) -> str:
    return json.dumps({"family": model.family, "prediction_type": model.prediction_type,
                       "zero_terminal_snr": model.zero_terminal_snr, "unet": _module_config(model.unet),
                       "vae": _module_config(model.vae),
                       "text_encoders": [_module_config(te) for te in model.text_encoders]})


def _save_dtype(dtype):
    """torch dtype to cast floating tensors to on save, or None to keep each tensor's own dtype."""
    if dtype in (None, KEEP_DTYPE):
        return None
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {KEEP_DTYPE}, {', '.join(DTYPES)}")
    return torch_dtype(dtype)


def _check_plain(module, what: str):
    for k in module.state_dict():
        if "lora_" in k or ".base_layer." in k or "hada_" in k or "lokr_" in k:
            raise ValueError(f"the {what} still carries training adapters ({k}); merge them first "
                             "(SaveCheckpoint does this) or save them as a LoRA")


def to_single_file_state(model: SDModel, *, dtype=None, use_ema: bool = False) -> dict:
    """The original-layout state dict for `model` (new tensors; the model is not touched), with the identity
    markers (`v_pred`, `ztsnr`). dtype None / "keep": each tensor keeps its dtype; else floats are cast."""
    import torch

    from . import keymap

    target = _save_dtype(dtype)
    unet = model.unet
    if use_ema:
        if model.ema_unet is None:
            raise ValueError("use_ema: this model has no EMA weights (train with use_ema on)")
        unet = model.ema_unet
    out = {}

    def emit(module, component, te_kind="", prefix="", what=""):
        _check_plain(module, what)
        rules, canon = module_rules(component, module, _module_config(module), model.family, te_kind, prefix)
        state = module.state_dict()
        for rule in rules:
            tensors = [state[canon[c]] for c in rule.diffusers]
            ldm_shape = None
            if component == "vae" and re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", rule.ldm) \
                    and tensors[0].ndim == 2:
                ldm_shape = (*tensors[0].shape, 1, 1)      # LDM stores these 1x1 projections as convs
            t = keymap.to_ldm(rule, tensors, ldm_shape)
            out[rule.ldm] = (t.to(target) if target is not None and t.is_floating_point() else t).contiguous()

    emit(unet, "unet", what="UNet")
    emit(model.vae, "vae", what="VAE")
    kinds = detect.text_encoder_prefixes(model.family, {})
    for (kind, prefix), te in zip(kinds, model.text_encoders):
        emit(te, "te", kind, prefix, what="text encoder")
    for k, v in model.extras.items():
        cast = target is not None and v.is_floating_point() and v.dtype != torch.int64 and "position_ids" not in k
        out[k] = (v.to(target) if cast else v).contiguous()
    out.update(identity.checkpoint_markers(model))
    return out


def save_single_file(model: SDModel, path: str, *, dtype=None, use_ema: bool = False,
                     metadata: dict | None = None) -> str:
    """Write `model` as one file in the original layout (.safetensors, or .ckpt/.pt), atomically.

    dtype None / "keep" writes every tensor in its own dtype; "fp16"/"bf16"/"fp32" casts the floating ones.
    The file carries the identity markers ComfyUI and A1111 read (`v_pred` / `ztsnr` keys, modelspec.*), and the
    pack's own config; `metadata` adds keys (it cannot contradict the model's prediction type).
    """
    import torch
    from safetensors.torch import save_file

    from ..fsutil import atomic_path, check_replaceable

    _save_dtype(dtype)
    ext = os.path.splitext(path)[1].lower()
    if ext not in SINGLE_FILE_EXTS:
        raise ValueError(f"{path}: the file name must end in .safetensors or .ckpt")
    check_replaceable(path)            # a folder of that name is never replaced by the file
    state = to_single_file_state(model, dtype=dtype, use_ema=use_ema)
    # not the output's name: file_hash ignores names, so two saves of the same weights must stay equal
    title = (os.path.splitext(os.path.basename(model.source.rstrip("/\\")))[0] if model.source
             else f"comfyui-dreambooth {model.family}")
    meta = {"format": "pt", CONFIG_METADATA_KEY: model_config_metadata(model),
            **identity.base_checkpoint_modelspec(model, title)}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    meta.update(identity.modelspec_identity(model))
    with atomic_path(path) as tmp:
        if ext in (".safetensors", ".sft"):
            save_file(state, tmp, metadata=meta)
        else:
            torch.save({"state_dict": state, "dreambooth_metadata": meta}, tmp)
    return path


def save_diffusers(model: SDModel, folder: str, *, dtype=None, use_ema: bool = False) -> str:
    """Write a diffusers pipeline folder (loads with diffusers' from_pretrained), atomically.
    dtype None / "keep": every tensor in its own dtype; else floats are cast."""
    import diffusers
    from diffusers import EulerDiscreteScheduler
    from safetensors.torch import save_file

    from ..fsutil import atomic_folder, check_replaceable

    folder = os.path.abspath(folder)
    check_replaceable(folder)          # replacing deletes what is there: only ever a diffusers model
    target = _save_dtype(dtype)
    unet = model.ema_unet if use_ema else model.unet
    if unet is None:
        raise ValueError("use_ema: this model has no EMA weights (train with use_ema on)")

    def cast(state):
        return {k: (v.to(target) if target is not None and v.is_floating_point() else v).contiguous()
                for k, v in state.items()}

    with atomic_folder(folder) as tmp:
        for name, module in (("unet", unet), ("vae", model.vae)):
            _check_plain(module, name)
            os.makedirs(os.path.join(tmp, name))
            module.save_config(os.path.join(tmp, name))
            save_file(cast(module.state_dict()), os.path.join(tmp, name, "diffusion_pytorch_model.safetensors"))
        te_extras = {}
        for i, (te, tok) in enumerate(zip(model.text_encoders, model.tokenizers)):
            sub = "text_encoder" if i == 0 else "text_encoder_2"
            _check_plain(te, sub)
            os.makedirs(os.path.join(tmp, sub))
            cfg = te.config.__class__.from_dict(te.config.to_dict())
            state = cast(te.state_dict())
            if model.family == "sd2" and model.dropped_text_layers == 0:
                last = cfg.num_hidden_layers - 1     # diffusers' SD2 runs 23 of 24 layers: keep the 24th aside
                layer_keys = [k for k in state if re.search(rf"encoder\.layers\.{last}\.", k)]
                te_extras.update({f"{sub}.{k}": state.pop(k) for k in layer_keys})
                cfg.num_hidden_layers = last
            cfg.architectures = [type(te).__name__]
            cfg.save_pretrained(os.path.join(tmp, sub))
            save_file(state, os.path.join(tmp, sub, "model.safetensors"), metadata={"format": "pt"})
            tok.save_pretrained(os.path.join(tmp, "tokenizer" if i == 0 else "tokenizer_2"))
        sched = EulerDiscreteScheduler.from_config({**SD_NOISE_SCHEDULE, "prediction_type": model.prediction_type,
                                                    "rescale_betas_zero_snr": model.zero_terminal_snr})
        sched.save_config(os.path.join(tmp, "scheduler"))
        index = {"_class_name": "StableDiffusionXLPipeline" if model.is_sdxl else "StableDiffusionPipeline",
                 "_diffusers_version": diffusers.__version__,
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                 "text_encoder": ["transformers", type(model.text_encoders[0]).__name__],
                 "tokenizer": ["transformers", "CLIPTokenizer"]}
        if model.is_sdxl:
            index.update(text_encoder_2=["transformers", type(model.text_encoders[1]).__name__],
                         tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True,
                         image_encoder=[None, None], feature_extractor=[None, None])
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None],
                         image_encoder=[None, None], requires_safety_checker=False)
        with open(os.path.join(tmp, "model_index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
        extras = {**cast(model.extras), **te_extras}
        save_file({k: v.contiguous() for k, v in extras.items()} or {},
                  os.path.join(tmp, "ldm_extras.safetensors"),
                  metadata={CONFIG_METADATA_KEY: json.dumps({"family": model.family,
                                                             "prediction_type": model.prediction_type,
                                                             "zero_terminal_snr": model.zero_terminal_snr})})
    return folder
