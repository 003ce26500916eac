"""Where and in what precision weights live during training: `weights_dtype`, `frozen_dtype` and moving frozen
parts off the accelerator.

- trained weights: fp32 master copies (default) or bf16 (`weights_dtype = bf16`; the optimizer then rounds every
  update stochastically, see fused.py).
- frozen weights on the accelerator: the compute precision's half type (auto), or bf16 / fp16 as chosen;
  `fp8` stores the frozen UNet layers (Linear / Conv2d under a LoRA) in float8_e4m3fn and casts each weight to
  the compute precision inside its own forward, one layer at a time (the cast copy lives only while autograd
  needs it; with gradient checkpointing only within the block being recomputed). At the end of training the
  trained model gets the base weights back in their original precision (from the received model), so samples
  and merged exports are not degraded.
- once latents and text embeddings are cached, the VAE and frozen text encoders move to the CPU
  (`offload_frozen`); previews bring them back for the time they take (`frozen_on`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..devices import is_accelerator, to_host

FP8 = getattr(torch, "float8_e4m3fn", None)


def trained_weight_dtype(settings) -> torch.dtype:
    return torch.bfloat16 if getattr(settings, "weights_dtype", "fp32") == "bf16" else torch.float32


def cast_trained(params, dtype: torch.dtype) -> None:
    with torch.no_grad():
        for p in params:
            if p.dtype != dtype:
                p.data = p.data.to(dtype)


def compute_dtype(mp: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)


def frozen_weight_dtype(settings, mp: str, device) -> torch.dtype | None:
    """The dtype frozen weights of training's own modules are held in on `device` (None: leave them)."""
    choice = getattr(settings, "frozen_dtype", "auto")
    if not is_accelerator(device):          # CPU compute runs in fp32 unless autocast says otherwise: leave them
        return None
    if choice in ("bf16", "fp16"):
        return torch.bfloat16 if choice == "bf16" else torch.float16
    if mp != "no":                    # auto, and fp8's non-layer weights (norms, biases, embeddings)
        return compute_dtype(mp)
    return None


# ---- fp8 storage, computed layer by layer -----------------------------------------------------------------------
class _Fp8Linear(torch.nn.Linear):
    def forward(self, x):
        bias = self.bias.to(self._db_compute) if self.bias is not None else None
        return F.linear(x.to(self._db_compute), self.weight.to(self._db_compute), bias)


class _Fp8Conv2d(torch.nn.Conv2d):
    def forward(self, x):
        bias = self.bias.to(self._db_compute) if self.bias is not None else None
        return self._conv_forward(x.to(self._db_compute), self.weight.to(self._db_compute), bias)


_FP8_CLASSES = {torch.nn.Linear: _Fp8Linear, torch.nn.Conv2d: _Fp8Conv2d}


def apply_fp8_storage(module, compute: torch.dtype) -> int:
    """Frozen Linear / Conv2d layers of `module` (all of whose parameters are frozen) keep their weight in
    float8_e4m3fn and compute in `compute`. Returns how many layers changed."""
    if FP8 is None:
        raise ValueError("frozen_dtype = 'fp8' needs torch >= 2.1 (float8 tensors); use frozen_dtype 'auto'")
    n = 0
    with torch.no_grad():
        for m in module.modules():
            cls = _FP8_CLASSES.get(type(m))
            if cls is None or any(p.requires_grad for p in m.parameters()):
                continue
            m._db_original_class, m._db_original_dtype = type(m), m.weight.dtype
            m.weight.data = m.weight.data.to(FP8)
            m._db_compute = compute
            m.__class__ = cls
            n += 1
    return n


def restore_fp8_storage(module, source) -> int:
    """Undo apply_fp8_storage on `module`, taking each weight back in full precision from the same layer of
    `source` (the received, untouched model part; adapter wrappers' `.base_layer` is looked through)."""
    n = 0
    with torch.no_grad(), torch.inference_mode(False):
        for name, m in module.named_modules():
            if type(m) not in (_Fp8Linear, _Fp8Conv2d):
                continue
            src = source.get_submodule(name.replace(".base_layer", ""))
            m.weight = torch.nn.Parameter(src.weight.detach().to(m.weight.device, m._db_original_dtype, copy=True),
                                          requires_grad=False)
            m.__class__ = m._db_original_class
            del m._db_original_class, m._db_original_dtype, m._db_compute
            n += 1
    return n


# ---- frozen parts off the accelerator -------------------------------------------------------------------------
def offload_frozen(tm, settings, device, *, te_trained: bool, text_cached: bool, latents_cached: bool) -> list:
    """Move the VAE (latents cached) and the frozen text encoders (embeddings cached, never trained, not needed
    by prior_mode = base_model) to the CPU. Returns the moved modules (bring them back with `frozen_on`)."""
    if not is_accelerator(device):
        return []
    moved = []
    if latents_cached:
        moved.append(tm.vae)
    if not te_trained and text_cached and settings.prior_mode != "base_model":
        moved.extend(tm.text_encoders)
    for m in moved:
        to_host(m)
    if moved and device.type == "cuda":
        torch.cuda.empty_cache()
    return moved


@contextlib.contextmanager
def frozen_on(device, modules):
    """Bring offloaded modules to `device` for the block (previews), then back to the CPU."""
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")


# ---- the precision a run computes in (the model as loaded, the device) ---------------------------------------
def mixed_precision(settings, device, say, model) -> str:
    mp = settings.mixed_precision
    if device.type == "cpu" and mp == "fp16":
        say("mixed_precision fp16 needs a GPU; training in fp32 on the CPU")
        mp = "no"
    loaded = next(model.unet.parameters()).dtype
    if mp == "no" and loaded in (torch.float16, torch.bfloat16):
        # fp32 compute would meet the frozen half-precision base weights in every layer (dtype mismatch)
        half = "bf16" if loaded == torch.bfloat16 else "fp16"
        if half == "fp16" and device.type == "cpu":
            raise ValueError("the model is loaded in fp16, which cannot train on the CPU; load it in fp32 or bf16 "
                             "(LoadBaseModel's dtype)")
        say(f"the model is loaded in {half}: computing in {half} mixed precision (trained weights stay fp32); "
            "load it in fp32 for full-precision training")
        mp = half
    return mp


def check_device_precision(settings, mp: str, device) -> None:
    """The checks that depend on mixed_precision (fused_backward, frozen_dtype) with `mp`, the precision this device
    and model really compute in; a refusal says why it differs from the setting and names a fix that works here."""
    from ..settings import SettingsError

    if mp == settings.mixed_precision:
        return
    problems = settings.replace(mixed_precision=mp).validate(check_environment=False)
    if not problems:
        return
    on_cpu = device.type == "cpu" and settings.mixed_precision == "fp16" and mp == "no"
    if on_cpu and settings.frozen_dtype in ("bf16", "fp16"):
        other = " or mixed_precision 'bf16'" if settings.frozen_dtype == "bf16" else ""
        raise SettingsError([
            f"frozen_dtype = {settings.frozen_dtype!r} with mixed_precision = 'fp16' on the CPU: the CPU trains in "
            "fp32 (mixed_precision 'fp16' becomes 'no' there), and half-precision frozen weights would meet fp32 "
            f"compute; set frozen_dtype 'auto'{other}, or train on a GPU"])
    why = ("the CPU trains in fp32: mixed_precision 'fp16' becomes 'no' there" if on_cpu else
           f"the model as loaded computes in {mp}: mixed_precision {settings.mixed_precision!r} becomes {mp!r}")
    raise SettingsError([f"{p} ({why})" for p in problems])


def vae_dtype(settings, device, say):
    if device.type == "cpu" and settings.vae_dtype == "fp16":
        say("vae_dtype fp16 needs a GPU; the VAE runs in fp32 on the CPU")
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(settings.vae_dtype, torch.float32)


__all__ = ["trained_weight_dtype", "cast_trained", "compute_dtype", "frozen_weight_dtype", "apply_fp8_storage",
           "restore_fp8_storage", "offload_frozen", "frozen_on", "mixed_precision", "check_device_precision", "vae_dtype"]
