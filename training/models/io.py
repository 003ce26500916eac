"""Load and save Stable Diffusion models: single-file (original layout) and diffusers folders.

Loading reads one tensor at a time from a lazily opened file (safetensors mmap / torch mmap) and assigns it
into modules built on the meta device, so the weights exist once in memory (plus one tensor in flight when a
dtype cast is asked for). Saving uses the same key map backwards, atomically.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field

from . import detect, identity
from .components import SD_NOISE_SCHEDULE, SDModel
from .detect import NotStableDiffusionError
from .tokenizing import tokenizers_for_family

SINGLE_FILE_EXTS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
CONFIG_METADATA_KEY = "comfyui_dreambooth.config"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
KEEP_DTYPE = "keep"      # save dtype None / "keep": every tensor as it is (lossless)


class ModelLoadError(ValueError):
    """A model file or folder that cannot be loaded; the message names the path and what to do."""


class StoredConfigWarning(UserWarning):
    """The pack's stored architecture config in a model file is malformed: the architecture comes from the
    weights' shapes instead (the weights themselves are fine)."""


# --------------------------------------------------------------------------------------------------
# Reading tensors lazily
# --------------------------------------------------------------------------------------------------
@dataclass
class LazyStateDict:
    path: str
    shapes: dict                       # key → tuple shape
    dtypes: dict                       # key → torch dtype name
    metadata: dict = field(default_factory=dict)
    _reader: object = None             # safe_open handle, or a dict of (mmapped) tensors
    renames: dict = field(default_factory=dict)   # normalised key → key in the file

    def get(self, key):
        src = self.renames.get(key, key)
        if isinstance(self._reader, dict):
            return self._reader[src]
        return self._reader.get_tensor(src)

    def __contains__(self, key):
        return key in self.shapes


def _normalized(lazy: LazyStateDict) -> LazyStateDict:
    """Give old SD1 files' text-encoder keys the modern 'text_model.' names (reads still hit the file's names)."""
    old_to_new = detect.normalize_sd1_text_keys(lazy.shapes)
    lazy.renames = {new: old for old, new in old_to_new.items()}
    lazy.shapes = {old_to_new.get(k, k): s for k, s in lazy.shapes.items()}
    lazy.dtypes = {old_to_new.get(k, k): d for k, d in lazy.dtypes.items()}
    return lazy


def _torch_dtype(name):
    import torch
    return getattr(torch, DTYPES.get(name, name)) if isinstance(name, str) else name


def open_state_dict(path: str) -> LazyStateDict:
    """Open a single-file checkpoint without reading the weights (clear errors for missing/corrupt/unsafe files)."""
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: file not found")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a folder; a diffusers folder needs model_index.json or unet/ + vae/")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".safetensors", ".sft"):
        return _open_safetensors(path)
    if ext in (".ckpt", ".pt", ".pth", ".bin"):
        return _open_torch(path)
    raise ModelLoadError(f"{path}: unknown model file type {ext!r}; expected one of {', '.join(SINGLE_FILE_EXTS)}")


def _open_safetensors(path):
    from safetensors import safe_open

    try:
        reader = safe_open(path, framework="pt", device="cpu")
        keys = list(reader.keys())
        shapes, dtypes = {}, {}
        for k in keys:
            sl = reader.get_slice(k)
            shapes[k] = tuple(sl.get_shape())
            dtypes[k] = sl.get_dtype()
        metadata = reader.metadata() or {}
    except Exception as e:   # safetensors raises its own error types (SafetensorError, OSError...)
        size = os.path.getsize(path)
        raise ModelLoadError(f"{path}: not a valid safetensors file ({size} bytes; truncated or corrupt: {e}). "
                             "Download or copy it again") from None
    return LazyStateDict(path, shapes, {k: _st_dtype(v) for k, v in dtypes.items()}, metadata, reader)


def _st_dtype(name: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
            "I32": "int32", "U8": "uint8", "BOOL": "bool", "I8": "int8", "I16": "int16"}.get(name, name.lower())


def _open_torch(path):
    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"{path}: refused to load: the file contains pickled Python objects beyond plain tensors, which could "
            f"run code on this machine ({str(e).splitlines()[0][:200]}). Only .ckpt files holding tensors are "
            "loaded (torch.load weights_only=True). If you trust the file, convert it to .safetensors with a "
            "trusted tool first") from None
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read this PyTorch checkpoint (truncated or corrupt?): {e}") from None
    metadata = {}
    if isinstance(obj, dict) and isinstance(obj.get("dreambooth_metadata"), dict):
        metadata = {str(k): str(v) for k, v in obj["dreambooth_metadata"].items()}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return LazyStateDict(path, {k: tuple(v.shape) for k, v in tensors.items()},
                         {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}, metadata, tensors)


# --------------------------------------------------------------------------------------------------
# Building modules from a lazy state dict
# --------------------------------------------------------------------------------------------------
def _canonical_te_key(module_key: str) -> str:
    """transformers 5 dropped 'text_model.' from CLIPTextModel keys; rules use the prefixed form."""
    if module_key.startswith(("text_model.", "text_projection")):
        return module_key
    return "text_model." + module_key


def _build_empty(factory):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _rules_for(component: str, module, config: dict, family: str, te_kind: str = "", prefix: str = ""):
    from . import keymap

    keys = list(module.state_dict().keys())
    if component == "unet":
        return keymap.unet_rules(keys, config), {k: k for k in keys}
    if component == "vae":
        return keymap.vae_rules(keys, config), {k: k for k in keys}
    canon = {_canonical_te_key(k): k for k in keys}
    rules = keymap.hf_clip_rules(canon, prefix) if te_kind == "hf" else keymap.open_clip_rules(canon, prefix)
    return rules, canon


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
    lazy = _normalized(open_state_dict(path))
    shapes = lazy.shapes
    family = detect.detect_family(shapes)
    stored = _family_stored_config(lazy.metadata, family, path)
    dtype = _torch_dtype(dtype) if dtype else None
    consumed: set = set()

    unet_cfg, unet = _build_component(path, "UNet", stored.get("unet"), lambda: detect.infer_unet_config(shapes, family),
                                      lambda cfg: UNet2DConditionModel(**cfg))
    rules, canon = _rules_for("unet", unet, dict(unet.config), family)
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
        rules, canon = _rules_for("te", te, te_cfg, family, kind, prefix)
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
        rules, canon = _rules_for("vae", vae, dict(vae.config), family)
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
    rules, canon = _rules_for("vae", vae, dict(vae.config), family)
    return _fill_module(vae, rules, canon, lazy, _torch_dtype(dtype) if dtype else None, "VAE", set())


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
            _open_torch(os.path.join(folder, name))


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
    dtype = _torch_dtype(dtype) if dtype else None

    def dtype_of(sub):      # dtype None keeps what the folder stores (diffusers would upcast fp16 to fp32)
        return dtype if dtype is not None else _stored_float_dtype(os.path.join(path, sub))

    extras, stored = {}, {}
    extras_file = os.path.join(path, "ldm_extras.safetensors")
    te_extras: dict = {}
    if os.path.exists(extras_file):
        lazy = _open_safetensors(extras_file)
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
                canon_state = {_canonical_te_key(k): v for k, v in state.items()}
                module_keys = {_canonical_te_key(k): k for k in te.state_dict()}
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
        rules, canon = _rules_for("unet", unet, dict(unet.config), family)
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
                    name = _st_dtype(f.get_slice(k).get_dtype())
                    if name.startswith(("float", "bfloat")):
                        found.add(name)
        except Exception:      # unreadable here: from_pretrained reports it properly
            return None
    return _torch_dtype(found.pop()) if len(found) == 1 else None


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
# Saving
# --------------------------------------------------------------------------------------------------
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
    return _torch_dtype(dtype)


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
        rules, canon = _rules_for(component, module, _module_config(module), model.family, te_kind, prefix)
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


# --------------------------------------------------------------------------------------------------
# Hashing and inspection
# --------------------------------------------------------------------------------------------------
def file_hash(path: str, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A fast content fingerprint (size + evenly spaced 64 KiB samples; all files of a folder).

    Reading a 6 GB checkpoint in full takes tens of seconds; this names caches and runs in milliseconds and
    still changes when any fine-tune, merge or re-save changes the file.
    """
    from ..fsutil import walk_files

    h = hashlib.sha256()
    # the files glob("**/*") lists (hidden ones left out), but each real folder once: a symlink loop inside a
    # diffusers folder (`unet/up -> ..`) made glob recurse without end
    files = [path] if os.path.isfile(path) else walk_files(path, skip_hidden=True)
    for p in files:
        size = os.path.getsize(p)
        if os.path.isdir(path):       # a folder's layout is part of it; a single file's name is not
            h.update(os.path.relpath(p, path).encode())
        h.update(size.to_bytes(8, "little"))
        with open(p, "rb") as f:
            start = _hash_safetensors_header(f, size, h) if p.lower().endswith((".safetensors", ".sft")) else 0
            data = size - start
            if data <= samples * chunk:
                h.update(f.read())
            else:
                for i in range(samples):
                    f.seek(start + (data - chunk) * i // (samples - 1))
                    h.update(f.read(chunk))
    return h.hexdigest()[:16]


def _hash_safetensors_header(f, size: int, h) -> int:
    """Hash the header as canonical JSON (safetensors writes metadata keys in no fixed order, so two saves of the
    same weights differ in bytes); returns where the tensor data starts."""
    raw = f.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    if n < 0 or 8 + n > size:
        f.seek(0)
        return 0
    try:
        header = json.loads(f.read(n))
        h.update(json.dumps(header, sort_keys=True).encode())
    except ValueError:
        f.seek(0)
        return 0
    return 8 + n


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
    lazy = _normalized(open_state_dict(path))
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
