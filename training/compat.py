"""The few places where the two dependency worlds ComfyUI installs have call for different code:
(a) transformers 4.x + huggingface-hub 0.x + diffusers <= 0.37, (b) transformers 5 + hub >= 1 + newer diffusers.
(The offline CLIP tokenizer, built the same way in both, is in models/tokenizing.py.)
"""
from __future__ import annotations

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
