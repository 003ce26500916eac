"""What a model trained by Imagic carries: the target text's embedding and the optimised one (`extras`, IMAGIC_KEYS,
(1, 77, D); SDXL also the pooled ones), their interpolation for sampling, and the sidecar file beside a LoRA.

Sampling, the exporters and training/imagic.py read them from here (this module knows nothing of training).
"""
from __future__ import annotations

TARGET_KEY = "imagic.target_embedding"
OPTIMIZED_KEY = "imagic.optimized_embedding"
TARGET_POOLED_KEY = "imagic.target_pooled"            # SDXL only
OPTIMIZED_POOLED_KEY = "imagic.optimized_pooled"      # SDXL only
IMAGIC_KEYS = (TARGET_KEY, OPTIMIZED_KEY, TARGET_POOLED_KEY, OPTIMIZED_POOLED_KEY)
SIDECAR_SUFFIX = ".imagic.safetensors"


# --------------------------------------------------------------------------------------------------------------
# The embeddings a model carries
# --------------------------------------------------------------------------------------------------------------
def is_imagic(model) -> bool:
    return TARGET_KEY in model.extras and OPTIMIZED_KEY in model.extras


def interpolated(model, alpha: float):
    """(embeds (1, 77k, D), pooled (1, P) or None): alpha * target + (1 - alpha) * optimised (Imagic eq. 3)."""
    ex = model.extras
    embeds = alpha * ex[TARGET_KEY].float() + (1.0 - alpha) * ex[OPTIMIZED_KEY].float()
    pooled = None
    if TARGET_POOLED_KEY in ex and OPTIMIZED_POOLED_KEY in ex:
        pooled = alpha * ex[TARGET_POOLED_KEY].float() + (1.0 - alpha) * ex[OPTIMIZED_POOLED_KEY].float()
    return embeds, pooled


def imagic_tensors(model) -> dict:
    return {k: v for k, v in model.extras.items() if k in IMAGIC_KEYS}


def sidecar_path(lora_path: str) -> str:
    """`x.safetensors` -> `x.imagic.safetensors` (beside the LoRA)."""
    stem = lora_path[:-len(".safetensors")] if lora_path.lower().endswith(".safetensors") else lora_path
    return stem + SIDECAR_SUFFIX


def save_sidecar(model, lora_path: str) -> str | None:
    """Write the model's Imagic embeddings beside a LoRA (fp32, atomically); None for a non-Imagic model."""
    from safetensors.torch import save_file

    from ..fsutil import atomic_path

    tensors = imagic_tensors(model)
    if not is_imagic(model):
        return None
    path = sidecar_path(lora_path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"format": "pt", "imagic.target_text": str(model.metadata.get("imagic", {})
                                                                        .get("target_text", ""))})
    return path


def load_sidecar(path: str) -> dict:
    """The Imagic tensors of a sidecar file (or of the LoRA it sits beside)."""
    from safetensors.torch import load_file

    if not path.endswith(SIDECAR_SUFFIX):
        path = sidecar_path(path)
    tensors = load_file(path)
    return {k: v for k, v in tensors.items() if k in IMAGIC_KEYS}


def with_imagic(model, tensors: dict):
    """A new SDModel carrying `tensors` (IMAGIC_KEYS) in its extras (e.g. from load_sidecar)."""
    return model.replace(extras={**model.extras, **tensors})
