"""Model files as state dicts, read lazily: one tensor at a time from a safetensors mmap or a torch mmap, so the
weights exist once in memory. Also the file vocabulary load.py and save.py share (extensions, dtypes, the stored
config key, ModelLoadError) and the sampled content hash that names a model.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field

from . import detect


SINGLE_FILE_EXTS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
CONFIG_METADATA_KEY = "comfyui_dreambooth.config"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPE_CHOICES = ("fp16", "bf16", "fp32")      # the save dtypes as offered (nodes, CLI): the usual one first
KEEP_DTYPE = "keep"      # save dtype None / "keep": every tensor as it is (lossless)


class ModelLoadError(ValueError):
    """A model file or folder that cannot be loaded; the message names the path and what to do."""


class StoredConfigWarning(UserWarning):
    """The pack's stored architecture config in a model file is malformed: the architecture comes from the
    weights' shapes instead (the weights themselves are fine)."""


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


def normalized(lazy: LazyStateDict) -> LazyStateDict:
    """Give old SD1 files' text-encoder keys the modern 'text_model.' names (reads still hit the file's names)."""
    old_to_new = detect.normalize_sd1_text_keys(lazy.shapes)
    lazy.renames = {new: old for old, new in old_to_new.items()}
    lazy.shapes = {old_to_new.get(k, k): s for k, s in lazy.shapes.items()}
    lazy.dtypes = {old_to_new.get(k, k): d for k, d in lazy.dtypes.items()}
    return lazy


def torch_dtype(name):
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
        return open_safetensors(path)
    if ext in (".ckpt", ".pt", ".pth", ".bin"):
        return open_torch(path)
    raise ModelLoadError(f"{path}: unknown model file type {ext!r}; expected one of {', '.join(SINGLE_FILE_EXTS)}")


def open_safetensors(path):
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
    return LazyStateDict(path, shapes, {k: safetensors_dtype(v) for k, v in dtypes.items()}, metadata, reader)


def safetensors_dtype(name: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
            "I32": "int32", "U8": "uint8", "BOOL": "bool", "I8": "int8", "I16": "int16"}.get(name, name.lower())


def open_torch(path):
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
