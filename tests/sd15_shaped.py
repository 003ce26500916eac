"""A random-weight model with the layer sizes ComfyUI's loader recognises as SD 1.5 (for the opt-in ComfyUI tests).

ComfyUI detects the model type from tensor shapes and matches only model_channels 320 / context_dim 768 / conv
projections for SD 1.5 (comfy/supported_models.py), builds its VAE with SD's fixed layout and its CLIP with CLIP-L's
fixed config; the tiny test models match none of these. So: a two-level UNet at 320/640 channels (~100M
parameters instead of 860M), SD's VAE and CLIP-L as they are. Random init, fixed seed; nothing is downloaded.
"""
from __future__ import annotations


def build_sd15_shaped_model(seed: int = 0, prediction_type: str = "epsilon"):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfyui_dreambooth.training.models import SDModel
    from comfyui_dreambooth.training.models.tokenizing import tokenizers_for_family

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(320, 640), cross_attention_dim=768, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512, scaling_factor=0.18215)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=1))
    for module in (unet, vae, clip):
        module.eval().requires_grad_(False)
    return SDModel(family="sd1", prediction_type=prediction_type, unet=unet, vae=vae, text_encoders=[clip],
                   tokenizers=tokenizers_for_family("sd1"), source="", source_hash=f"sd15-shaped-{seed}")


def save_sd15_shaped_checkpoint(path: str, seed: int = 0) -> str:
    from comfyui_dreambooth.training.models import save_single_file

    return save_single_file(build_sd15_shaped_model(seed), path, dtype="fp16")
