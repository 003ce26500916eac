"""The few places where the two dependency worlds ComfyUI installs have call for different code:
(a) transformers 4.x + huggingface-hub 0.x + diffusers <= 0.37, (b) transformers 5 + hub >= 1 + newer diffusers.
(The offline CLIP tokenizer, built the same way in both, is in models/tokenizing.py.) And which optional packages
are installed: settings validation (no torch) and setup/optimizers ask the same functions here.
"""
from __future__ import annotations

import importlib.util

_NON_REENTRANT = {"use_reentrant": False}


def enable_text_encoder_checkpointing(text_encoder) -> None:
    """Gradient checkpointing on a transformers text encoder, non-reentrant in every version.

    transformers 4.x defaults to reentrant checkpointing, which gives no gradients inside the checkpointed layers
    when no input of a layer requires grad: with frozen embeddings (LoRA on the text encoder) the adapters there
    never learn. transformers 5 defaults to non-reentrant and renamed the method (the old name warns).
    """
    enable = getattr(text_encoder, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(_NON_REENTRANT))
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(_NON_REENTRANT))


# ---- optional packages: is it installed, and which optimizer needs which (settings and setup/optimizers ask) ----
# optimizer -> [(module to import, pip package)], any one of them is enough
OPTIONAL_PACKAGES = {
    "AdamW8bit": [("bitsandbytes", "bitsandbytes")],
    "Lion8bit": [("bitsandbytes", "bitsandbytes")],
    "Lion": [("lion_pytorch", "lion-pytorch"), ("bitsandbytes", "bitsandbytes")],
    "Prodigy": [("prodigyopt", "prodigyopt")],
    "Adafactor": [("transformers", "transformers")],
}
_ALTERNATIVE = {"AdamW8bit": "AdamW", "Lion8bit": "Lion or AdamW", "Lion": "AdamW", "Prodigy": "AdamW",
                "Adafactor": "AdamW"}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_hint(name: str) -> str:
    pips = " or ".join(f"`pip install {pip}`" for _, pip in OPTIONAL_PACKAGES[name])
    return (f"{pips} into the Python environment that runs ComfyUI (or this CLI), or choose optimizer "
            f"'{_ALTERNATIVE[name]}'")


def missing_optimizer_package(name: str) -> str | None:
    """None when `name` can be built here; else a sentence naming the pip package and an alternative."""
    options = OPTIONAL_PACKAGES.get(name)
    if not options or any(installed(module) for module, _ in options):
        return None
    packages = " or ".join(pip for _, pip in options)
    return f"needs the package {packages}, which is not installed; {install_hint(name)}"
