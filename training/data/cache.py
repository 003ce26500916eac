"""Tensor caches for VAE latents and text-encoder outputs: on disk (reused across runs) or in memory.

Keys are sha256 digests of everything that changes the cached value: the image content hash, a fingerprint
of the weights that produced it (VAE or text encoders), and the settings that matter (bucket, crop, flip,
background, caption, clip skip, ...). So an entry is never stale: change any input and the key changes;
nothing needs invalidating by hand, and the folder is safe to delete.

Disk entries are safetensors files written atomically (temporary file in the same folder, then
`os.replace`), so a killed run never leaves half a file under a real key. An entry that fails to load
(truncated, wrong tensors) is treated as missing and recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from typing import Callable

CACHE_FORMAT = 1   # bump when the meaning of cached tensors changes


def make_key(*parts) -> str:
    """A stable digest of JSON-able parts."""
    text = json.dumps([CACHE_FORMAT, *parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_fingerprint_memo: dict[int, tuple] = {}


def _weights_state(module) -> tuple:
    """Identity of a module's current weights: storage pointers and in-place version counters.

    PyTorch bumps a tensor's `_version` on every in-place change (optimizer steps included) and a
    load/replace gives it new storage, so an unchanged state means unchanged weights. Inference tensors
    (weights ComfyUI loaded under inference_mode) have no version counter; they cannot change in place outside
    inference mode, so their storage pointer identifies them."""
    return tuple((name, t.data_ptr(), 0 if t.is_inference() else t._version, tuple(t.shape), str(t.dtype))
                 for name, t in module.state_dict(keep_vars=True).items())


def _fingerprint_one(module) -> str:
    import torch

    state = _weights_state(module)
    memo = _fingerprint_memo.get(id(module))
    if memo is not None and memo[0]() is module and memo[1] == state:
        return memo[2]
    h = hashlib.sha256(type(module).__name__.encode())
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel() == 0:
                continue
            f = t.detach().reshape(-1)
            stride = max(1, f.numel() // 64)
            sample = f[::stride][:64].to(torch.float64)
            total = _abs_sum_float64(f).reshape(1)
            h.update(torch.cat([total, sample]).cpu().numpy().tobytes())
    digest = h.hexdigest()
    if len(_fingerprint_memo) > 64:
        _fingerprint_memo.clear()
    _fingerprint_memo[id(module)] = (weakref.ref(module), state, digest)   # weak: never keeps a model alive
    return digest


FINGERPRINT_CHUNK = 1 << 22     # elements: 32 MiB of float64 at a time


def _abs_sum_float64(flat):
    """sum(|x|) in float64 of a 1-D tensor, a chunk at a time: a float64 copy of a whole large tensor (CLIP's
    token embedding: 38 M elements, 0.3 GB, and its abs another 0.3 GB) was data preparation's largest transient,
    above a low-memory CPU run's training peak (issue 21.4). Tensors up to one chunk are summed as before."""
    import torch

    if flat.numel() <= FINGERPRINT_CHUNK:
        return flat.to(torch.float64).abs().sum()
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for chunk in flat.split(FINGERPRINT_CHUNK):
        total += chunk.to(torch.float64).abs_().sum()
    return total


def module_fingerprint(*modules) -> str:
    """A content fingerprint of modules' weights: names, shapes, dtypes, per-tensor |sum| and samples.

    Cheaper than hashing every byte (it runs where the weights live, GPU included) and it changes whenever
    training changes a weight, so a trained text encoder never reuses the base model's cached embeddings.
    Remembered per module while its weights are untouched (see `_weights_state`).
    """
    h = hashlib.sha256()
    for module in modules:
        h.update(b"none" if module is None else _fingerprint_one(module).encode())
    return h.hexdigest()


def tensors_digest(tensors: dict) -> str:
    """sha256 of names, dtypes, shapes and bytes: a cache entry's checksum (entries are small: ~100 KB)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TensorCache:
    """key -> dict of tensors (CPU). `mode` "disk" keeps files under `folder`; "memory" keeps a dict.

    Thread-safe for the simple get/put use here. `hits` / `misses` / `recomputed` count lookups, for the report.
    """

    def __init__(self, folder: str | None, mode: str = "disk"):
        if mode not in ("disk", "memory"):
            raise ValueError(f"cache mode {mode!r}: use 'disk' or 'memory'")
        if mode == "disk" and not folder:
            raise ValueError("a disk cache needs a folder (cache_dir)")
        self.folder = folder
        self.mode = mode
        self._memory: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.recomputed = 0   # entries that existed but could not be read

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, key[:2], key + ".safetensors")

    def get(self, key: str, expect: Callable[[dict], bool] | None = None) -> dict | None:
        """The cached tensors, or None when absent or unreadable (or when `expect(tensors)` is False)."""
        if self.mode == "memory":
            with self._lock:
                value = self._memory.get(key)
            self._count(value is not None)
            return value
        path = self._path(key)
        if not os.path.exists(path):
            self._count(False)
            return None
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(path, framework="pt") as f:
                stored = (f.metadata() or {}).get("sha256")
            value = load_file(path)
            if stored != tensors_digest(value):      # damaged data under an intact header (or an older format)
                raise ValueError("checksum mismatch")
            if expect is not None and not expect(value):
                raise ValueError("unexpected tensors")
        except Exception:
            # corrupt / truncated / foreign: recompute and overwrite, never fail the run for it
            with self._lock:
                self.recomputed += 1
            self._count(False)
            return None
        self._count(True)
        return value

    def put(self, key: str, tensors: dict) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        if self.mode == "memory":
            with self._lock:
                self._memory[key] = tensors
            return
        from safetensors.torch import save_file

        from ..fsutil import atomic_path

        with atomic_path(self._path(key)) as tmp:
            save_file(tensors, tmp, metadata={"format": str(CACHE_FORMAT), "sha256": tensors_digest(tensors)})

    def get_or_compute(self, key: str, compute: Callable[[], dict], expect=None) -> dict:
        value = self.get(key, expect)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def _count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def stats(self) -> dict:
        return {"mode": self.mode, "hits": self.hits, "misses": self.misses, "recomputed": self.recomputed}


__all__ = ["CACHE_FORMAT", "make_key", "module_fingerprint", "tensors_digest", "TensorCache"]
