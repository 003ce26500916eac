"""Load Stable Diffusion models: single-file (original layout) and diffusers folders, and inspect a model file.

Loading reads one tensor at a time from a lazily opened file (state_dict.py) and assigns it into modules built on
the meta device, so the weights exist once in memory (plus one tensor in flight when a dtype cast is asked for).
Saving (save.py) uses the same key map (keymap.py) backwards.
"""
from __future__ import annotations

import glob
import json
import os
import warnings

from . import detect, identity
from .components import SDModel
from .detect import NotStableDiffusionError
from .keymap import canonical_te_key, module_rules
from .state_dict import (CONFIG_METADATA_KEY, LazyStateDict, ModelLoadError, StoredConfigWarning,
                         file_hash, normalized, open_safetensors, open_state_dict, open_torch, safetensors_dtype,
                         torch_dtype)
from .tokenizing import tokenizers_for_family

# --------------------------------------------------------------------------------------------------
# Building modules from a lazy state dict
# --------------------------------------------------------------------------------------------------
def _build_empty(factory):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _fill_module(module, rules, canon_to_module, lazy: LazyStateDict, dtype, component: str, consumed: set):
    """Assign every tensor of `module` from `lazy` through `rules`; error listing what is missing."""
    from . import keymap

    module_state = module.state_dict()        # once: a state_dict() per key made loading quadratic
    shapes = {canon: tuple(module_state[mk].shape) for canon, mk in canon_to_module.items()}
    missing = [r.ldm for r in rules if r.ldm not in lazy]
    if missing:
        raise ModelLoadError(f"{lazy.path}: the {component} is missing {len(missing)} tensors the inferred "
                             f"architecture needs, e.g. {missing[:3]}; the file is incomplete or not a standard layout")
    state = {}
    for rule in rules:
        tensor = lazy.get(rule.ldm)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        for canon, t in keymap.to_diffusers(rule, tensor, shapes).items():
            if tuple(t.shape) != shapes[canon]:
                raise ModelLoadError(f"{lazy.path}: {rule.ldm} has shape {tuple(t.shape)}, the {component} expects "
                                     f"{shapes[canon]}")
            state[canon_to_module[canon]] = t.clone() if rule.kind == "split3" else t
        consumed.add(rule.ldm)
    # buffers that are not in the file (e.g. position_ids) keep their initialised values
    module.load_state_dict(state, strict=False, assign=True)
    leftovers = [n for n, p in module.named_parameters() if p.is_meta]
    if leftovers:
        raise ModelLoadError(f"{lazy.path}: the {component} has no weights for {leftovers[:3]}")
    module.eval().requires_grad_(False)
    return module


def _check_requested(requested) -> None:
    if requested not in ("auto", "", None, *identity.PREDICTION_TYPES):
        raise ModelLoadError(f"prediction_type {requested!r} is not one of auto, epsilon, v_prediction")


def _single_file_identity(lazy: LazyStateDict, family: str, path: str, requested: str,
                          stored: dict) -> identity.Identity:
    """Prediction type and zero-terminal SNR of a single file (precedence: training/models/identity.py).
    Reads at most one tensor (SD2's norm bias), and only when no marker decided."""
    def sd2_rule():
        key = detect.UNET_PREFIX + identity.SD2_VPRED_TENSOR
        in_channels = lazy.shapes[detect.UNET_PREFIX + "input_blocks.0.0.weight"][1]
        return identity.sd2_weights_rule(in_channels, lazy.get(key) if key in lazy else None)

    _check_requested(requested)
    return identity.resolve(requested, family, flags={k for k in detect.FLAG_KEYS if k in lazy.shapes},
                            sidecar=identity.read_sidecar(path), metadata=lazy.metadata, stored=stored,
                            weights_rule=sd2_rule)


def _ignore_stored(path: str, why: str) -> None:
    warnings.warn(f"{path}: ignoring the pack's stored config ({CONFIG_METADATA_KEY} metadata): {why}; the "
                  f"architecture is inferred from the weights instead", StoredConfigWarning, stacklevel=3)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), f"a {type(value).__name__}")


def _stored_config(metadata: dict, path: str = "") -> dict:
    """The pack's stored config, its malformed parts left out (with a StoredConfigWarning naming the file)."""
    raw = metadata.get(CONFIG_METADATA_KEY)
    if not raw:
        return {}
    try:
        stored = json.loads(raw)
    except (ValueError, RecursionError):
        _ignore_stored(path, "it is not JSON")
        return {}
    if not isinstance(stored, dict):
        _ignore_stored(path, f"it is {_kind(stored)}, not an object")
        return {}
    stored = dict(stored)
    for key in ("unet", "vae"):
        if stored.get(key) is not None and not isinstance(stored[key], dict):
            _ignore_stored(path, f"its '{key}' is {_kind(stored.pop(key))}, not an object")
    encoders = stored.get("text_encoders")
    if encoders is not None and not (isinstance(encoders, list)
                                     and all(e is None or isinstance(e, dict) for e in encoders)):
        _ignore_stored(path, "its 'text_encoders' is not a list of objects")
        stored.pop("text_encoders")
    return stored


def _family_stored_config(metadata: dict, family: str, path: str = "") -> dict:
    """The pack's stored config, unless it names another family (then it is not about these weights)."""
    stored = _stored_config(metadata, path)
    return stored if stored.get("family") in (None, family) else {}


def _build_component(path: str, component: str, stored_cfg, infer, factory):
    """(config, empty module): built from the pack's stored config when there is one and the class takes it,
    else from the config inferred from the weights' shapes."""
    if stored_cfg:
        try:
            return stored_cfg, _build_empty(lambda: factory(stored_cfg))
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            _ignore_stored(path, f"the {component} does not build from it ({type(e).__name__}: {str(e)[:160]})")
    cfg = infer()
    return cfg, _build_empty(lambda: factory(cfg))


def load_single_file(path: str, *, prediction_type: str = "auto", dtype=None, vae_path: str | None = None) -> SDModel:
    import torch  # noqa: F401  (modules need it)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _check_requested(prediction_type)
    lazy = normalized(open_state_dict(path))
    shapes = lazy.shapes
    family = detect.detect_family(shapes)
    stored = _family_stored_config(lazy.metadata, family, path)
    dtype = torch_dtype(dtype) if dtype else None
    consumed: set = set()

    unet_cfg, unet = _build_component(path, "UNet", stored.get("unet"), lambda: detect.infer_unet_config(shapes, family),
                                      lambda cfg: UNet2DConditionModel(**cfg))
    rules, canon = module_rules("unet", unet, dict(unet.config), family)
    _fill_module(unet, rules, canon, lazy, dtype, "UNet", consumed)

    text_encoders = []
    stored_encoders = stored.get("text_encoders") or []
    encoder_prefixes = detect.text_encoder_prefixes(family, shapes)
    if stored_encoders and len(stored_encoders) != len(encoder_prefixes):
        _ignore_stored(path, f"its 'text_encoders' has {len(stored_encoders)} entries for "
                             f"{len(encoder_prefixes)} text encoder(s)")
        stored_encoders = []
    for i, (kind, prefix) in enumerate(encoder_prefixes):
        with_projection = family == "sdxl" and i == 1
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        te_cfg, te = _build_component(
            path, f"text encoder {i + 1}", stored_encoders[i] if i < len(stored_encoders) else None,
            lambda: (detect.infer_hf_clip_config(shapes, prefix) if kind == "hf"
                     else detect.infer_open_clip_config(shapes, prefix)),
            lambda cfg: cls(CLIPTextConfig(**cfg)))
        rules, canon = module_rules("te", te, te_cfg, family, kind, prefix)
        _fill_module(te, rules, canon, lazy, dtype, f"text encoder {i + 1}", consumed)
        text_encoders.append(te)

    if vae_path:
        vae = load_vae(vae_path, family=family, dtype=dtype)
        consumed.update(k for k in shapes if k.startswith(detect.VAE_PREFIX))
    else:
        if not any(k.startswith(detect.VAE_PREFIX) for k in shapes):
            raise ModelLoadError(f"{path}: has no VAE ('first_stage_model.*'); choose a VAE file (vae_path / the "
                                 "node's vae input)")
        _, vae = _build_component(path, "VAE", stored.get("vae"), lambda: detect.infer_vae_config(shapes, family),
                                  lambda cfg: AutoencoderKL(**cfg))
        rules, canon = module_rules("vae", vae, dict(vae.config), family)
        _fill_module(vae, rules, canon, lazy, dtype, "VAE", consumed)

    flags = {k for k in detect.FLAG_KEYS if k in shapes}
    extras = {}
    dropped = 0
    for k in shapes:
        if k in consumed or k in flags:
            continue
        if k.startswith("model_ema."):
            dropped += 1       # EMA copies inside base checkpoints are not carried (train EMA anew)
            continue
        extras[k] = lazy.get(k)
    ident = _single_file_identity(lazy, family, path, prediction_type, stored)
    metadata = {"identity": ident.as_dict()}
    if dropped:
        metadata["dropped_ema_tensors"] = dropped
    return SDModel(family=family, prediction_type=ident.prediction_type, unet=unet, vae=vae,
                   text_encoders=text_encoders, tokenizers=tokenizers_for_family(family), source=os.path.abspath(path),
                   source_hash=file_hash(path), extras=extras, zero_terminal_snr=ident.zero_terminal_snr,
                   metadata=metadata)


def load_vae(path: str, *, family: str = "sd1", dtype=None):
    """A VAE override: a diffusers vae folder, or a file in LDM ('first_stage_model.*' or bare) or diffusers keys."""
    from diffusers import AutoencoderKL

    if os.path.isdir(path):
        sub = path if os.path.exists(os.path.join(path, "config.json")) else os.path.join(path, "vae")
        _refuse_pickled_weights(sub)
        try:
            return AutoencoderKL.from_pretrained(sub, local_files_only=True, torch_dtype=dtype).eval().requires_grad_(False)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: not a diffusers VAE folder ({e})") from None
    lazy = open_state_dict(path)
    keys = list(lazy.shapes)
    if any(k.startswith("encoder.down_blocks.") for k in keys):      # diffusers key names in one file
        raise ModelLoadError(f"{path}: VAE files with diffusers key names need their config.json: put the file in a "
                             "folder with it (models/vae/<name>/) and select the folder")
    if not any(k.startswith(detect.VAE_PREFIX) for k in keys):
        if not any(k.startswith("encoder.down.") for k in keys):
            raise ModelLoadError(f"{path}: not a VAE (no 'encoder.down.*' / 'first_stage_model.*' tensors)")
        lazy.renames = {detect.VAE_PREFIX + k: k for k in keys}
        lazy.shapes = {detect.VAE_PREFIX + k: s for k, s in lazy.shapes.items()}
    cfg = detect.infer_vae_config(lazy.shapes, family)
    vae = _build_empty(lambda: AutoencoderKL(**cfg))
    rules, canon = module_rules("vae", vae, dict(vae.config), family)
    return _fill_module(vae, rules, canon, lazy, torch_dtype(dtype) if dtype else None, "VAE", set())


# --------------------------------------------------------------------------------------------------
# Diffusers folders
# --------------------------------------------------------------------------------------------------
def is_diffusers_folder(path: str) -> bool:
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, "model_index.json"))
                                    or os.path.isdir(os.path.join(path, "unet")))


def _refuse_pickled_weights(folder: str) -> None:
    """A component folder whose weights are pickle files (.bin/.pt/.pth/.ckpt, no .safetensors): each is read with
    weights_only=True here first, so one holding more than tensors is refused by name (ModelLoadError, as for a
    single .ckpt) and never reaches a library's own unpickling."""
    if not os.path.isdir(folder) or glob.glob(os.path.join(glob.escape(folder), "*.safetensors")):
        return                              # the libraries load .safetensors when there is one
    for name in sorted(os.listdir(folder)):
        if name.lower().endswith((".bin", ".pt", ".pth", ".ckpt")) and os.path.isfile(os.path.join(folder, name)):
            open_torch(os.path.join(folder, name))


def _folder_family(path: str) -> str:
    index = {}
    if os.path.exists(os.path.join(path, "model_index.json")):
        with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
    if "XL" in index.get("_class_name", "") or os.path.isdir(os.path.join(path, "text_encoder_2")):
        return "sdxl"
    cfg_path = os.path.join(path, "text_encoder", "config.json")
    if not os.path.exists(cfg_path):
        raise ModelLoadError(f"{path}: diffusers folder without text_encoder/config.json")
    with open(cfg_path, encoding="utf-8") as f:
        te = json.load(f)
    return "sd2" if te.get("hidden_act") == "gelu" else "sd1"


def load_diffusers_folder(path: str, *, prediction_type: str = "auto", dtype=None, vae_path: str | None = None) -> SDModel:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _check_requested(prediction_type)
    family = _folder_family(path)
    dtype = torch_dtype(dtype) if dtype else None

    def dtype_of(sub):      # dtype None keeps what the folder stores (diffusers would upcast fp16 to fp32)
        return dtype if dtype is not None else _stored_float_dtype(os.path.join(path, sub))

    extras, stored = {}, {}
    extras_file = os.path.join(path, "ldm_extras.safetensors")
    te_extras: dict = {}
    if os.path.exists(extras_file):
        lazy = open_safetensors(extras_file)
        stored = _family_stored_config(lazy.metadata, family, extras_file)
        for k in lazy.shapes:
            if k.startswith(("text_encoder.", "text_encoder_2.")):
                te_extras[k] = lazy.get(k)
            else:
                extras[k] = lazy.get(k)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _refuse_pickled_weights(os.path.join(path, sub))
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True,
                                                    torch_dtype=dtype_of("unet"))
        vae = (load_vae(vae_path, family=family, dtype=dtype) if vae_path else
               AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=dtype_of("vae")))
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"{path}: cannot load the diffusers folder ({e})") from None
    text_encoders = []
    dropped = 0
    for i, sub in enumerate(["text_encoder", "text_encoder_2"][: 2 if family == "sdxl" else 1]):
        cls = CLIPTextModelWithProjection if (family == "sdxl" and i == 1) else CLIPTextModel
        own = {k[len(sub) + 1:]: v for k, v in te_extras.items() if k.startswith(sub + ".")}
        te_dtype = dtype_of(sub)
        try:
            if own:    # our SD2 folders keep OpenCLIP's last layer aside (diffusers' SD2 uses 23 of 24 layers)
                cfg = CLIPTextConfig.from_pretrained(os.path.join(path, sub), local_files_only=True)
                cfg.num_hidden_layers += 1
                te = _build_empty(lambda: cls(cfg))
                from safetensors.torch import load_file
                files = sorted(glob.glob(os.path.join(path, sub, "*.safetensors")))
                state = {}
                for fpath in files:
                    state.update(load_file(fpath))
                state.update(own)
                canon_state = {canonical_te_key(k): v for k, v in state.items()}
                module_keys = {canonical_te_key(k): k for k in te.state_dict()}
                te.load_state_dict({module_keys[c]: (v.to(te_dtype) if te_dtype and v.is_floating_point() else v)
                                    for c, v in canon_state.items() if c in module_keys}, strict=False, assign=True)
            else:
                te = cls.from_pretrained(os.path.join(path, sub), local_files_only=True, torch_dtype=te_dtype)
                if family == "sd2":
                    dropped = 1
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: cannot load {sub}/ ({e})") from None
        text_encoders.append(te.eval().requires_grad_(False))
    for m in (unet, vae):
        m.eval().requires_grad_(False)
    scheduler = {}
    sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.exists(sched_path):
        try:
            with open(sched_path, encoding="utf-8") as f:
                scheduler = json.load(f)
        except (OSError, ValueError):
            scheduler = {}
    flags = {k for k in detect.FLAG_KEYS if k in extras}
    for k in flags:
        extras.pop(k)

    def sd2_rule():      # the same tensor ComfyUI measures, found through the key map
        rules, canon = module_rules("unet", unet, dict(unet.config), family)
        target = detect.UNET_PREFIX + identity.SD2_VPRED_TENSOR
        rule = next((r for r in rules if r.ldm == target), None)
        bias = unet.state_dict()[canon[rule.diffusers[0]]] if rule else None
        return identity.sd2_weights_rule(unet.config.in_channels, bias)

    ident = identity.resolve(prediction_type, family, flags=flags, stored=stored,
                             scheduler=scheduler if isinstance(scheduler, dict) else {}, weights_rule=sd2_rule)
    del torch
    return SDModel(family=family, prediction_type=ident.prediction_type, unet=unet, vae=vae,
                   text_encoders=text_encoders, tokenizers=tokenizers_for_family(family), source=os.path.abspath(path),
                   source_hash=file_hash(path), extras=extras, dropped_text_layers=dropped,
                   zero_terminal_snr=ident.zero_terminal_snr, metadata={"identity": ident.as_dict()})


def _stored_float_dtype(folder: str):
    """The one floating dtype of a component folder's .safetensors weights, else None (mixed, or other formats)."""
    from safetensors import safe_open

    found = set()
    for fpath in glob.glob(os.path.join(folder, "*.safetensors")):
        try:
            with safe_open(fpath, framework="pt", device="cpu") as f:
                for k in f.keys():
                    name = safetensors_dtype(f.get_slice(k).get_dtype())
                    if name.startswith(("float", "bfloat")):
                        found.add(name)
        except Exception:      # unreadable here: from_pretrained reports it properly
            return None
    return torch_dtype(found.pop()) if len(found) == 1 else None


def load_model(path: str, *, prediction_type: str = "auto", vae_path: str | None = None, dtype=None) -> SDModel:
    """Load a single-file checkpoint (.safetensors/.ckpt) or a diffusers folder into an SDModel."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        if not is_diffusers_folder(path):
            raise ModelLoadError(f"{path}: folder is not a diffusers model (no model_index.json or unet/)")
        return load_diffusers_folder(path, prediction_type=prediction_type, dtype=dtype, vae_path=vae_path)
    try:
        return load_single_file(path, prediction_type=prediction_type, dtype=dtype, vae_path=vae_path)
    except NotStableDiffusionError as e:
        raise ModelLoadError(f"{path}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------------
def inspect_model(path: str) -> dict:
    """Family, prediction type and zero-terminal SNR (each with its source), parameter counts per component and
    dtype. A single file is read lazily: no weights except, for SD2 without markers, one norm-bias tensor."""
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        model = load_model(path)
        counts = {"unet": sum(p.numel() for p in model.unet.parameters()),
                  "vae": sum(p.numel() for p in model.vae.parameters())}
        for i, te in enumerate(model.text_encoders):
            counts[f"text_encoder{'' if i == 0 else '_2'}"] = sum(p.numel() for p in te.parameters())
        dtype = str(next(model.unet.parameters()).dtype).removeprefix("torch.")
        return {"path": os.path.abspath(path), "format": "diffusers", "family": model.family,
                **model.metadata["identity"], "parameters": counts, "dtype": dtype, "hash": model.source_hash}
    lazy = normalized(open_state_dict(path))
    try:
        family = detect.detect_family(lazy.shapes)
    except NotStableDiffusionError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    groups = {"unet": detect.UNET_PREFIX, "vae": detect.VAE_PREFIX}
    for i, (_, prefix) in enumerate(detect.text_encoder_prefixes(family, lazy.shapes)):
        root = prefix.split(".transformer.")[0] + "." if family == "sd1" else prefix
        groups[f"text_encoder{'' if i == 0 else '_2'}"] = root
    counts = {name: 0 for name in groups}
    dtype_counts: dict[str, int] = {}
    for k, shape in lazy.shapes.items():
        n = 1
        for s in shape:
            n *= s
        for name, prefix in groups.items():
            if k.startswith(prefix):
                counts[name] += n
        dtype_counts[lazy.dtypes[k]] = dtype_counts.get(lazy.dtypes[k], 0) + n
    ident = _single_file_identity(lazy, family, path, "auto", _family_stored_config(lazy.metadata, family, path))
    return {"path": os.path.abspath(path), "format": os.path.splitext(path)[1].lstrip(".").lower(),
            "family": family, **ident.as_dict(), "parameters": counts,
            "dtype": max(dtype_counts, key=dtype_counts.get) if dtype_counts else None,
            "tensors": len(lazy.shapes), "hash": file_hash(path)}
