"""A random-weight model with the layer sizes ComfyUI's loader recognises as SD 1.5 (for the opt-in ComfyUI tests).

ComfyUI detects the model type from tensor shapes and matches only model_channels 320 / context_dim 768 / conv
projections for SD 1.5 (comfy/supported_models.py), builds its VAE with SD's fixed layout and its CLIP with CLIP-L's
fixed config; the tiny test models match none of these. So: a two-level UNet at 320/640 channels (~100M
parameters instead of 860M), SD's VAE and CLIP-L as they are. Random init, fixed seed; nothing is downloaded.
"""
from __future__ import annotations


def build_sd15_shaped_model(seed: int = 0, prediction_type: str = "epsilon"):
    from comfyui_dreambooth.training.models.tiny import build_random_sd15

    model = build_random_sd15(seed, unet="reduced", prediction_type=prediction_type)
    return model.replace(source_hash=f"sd15-shaped-{seed}")


def save_sd15_shaped_checkpoint(path: str, seed: int = 0) -> str:
    from comfyui_dreambooth.training.models import save_single_file

    return save_single_file(build_sd15_shaped_model(seed), path, dtype="fp16")
