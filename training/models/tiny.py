"""Tiny random-init models of each family, same layout as the real ones, for tests and the embedded demo.

Every structural feature that loading/saving/training must handle is present (cross-attention blocks,
down/up samplers, linear vs conv projections, SDXL's two encoders and size conditioning), only narrower.
"""
from __future__ import annotations

from .components import SD_NOISE_SCHEDULE, SDModel
from .tokenizing import tokenizers_for_family

VOCAB = 49408


def _text_encoder(kind: str, hidden: int, layers: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                         hidden_act="quick_gelu" if kind == "openai" else "gelu",
                         projection_dim=projection_dim or hidden,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1 if kind == "openai" else 0)
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return cls(cfg)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=0.18215)


def build_tiny_model(family: str = "sd1", seed: int = 0, prediction_type: str | None = None) -> SDModel:
    """A random-init SDModel: UNet block_out_channels (32, 64), 2-layer CLIP(s) of width 32, 2-level VAE."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), norm_num_groups=32)
    if family == "sd1":
        tes = [_text_encoder("openai", 32, 2)]
        unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = _vae()
        pred = prediction_type or "epsilon"
    elif family == "sd2":
        tes = [_text_encoder("openclip", 32, 3)]
        unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=(2, 4),
                                    use_linear_projection=True,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae = _vae()
        pred = prediction_type or "v_prediction"
    elif family == "sdxl":
        tes = [_text_encoder("openai", 32, 2), _text_encoder("openclip", 32, 3, projection_dim=32)]
        unet = UNet2DConditionModel(**common, cross_attention_dim=64, attention_head_dim=(2, 4),
                                    use_linear_projection=True, transformer_layers_per_block=(1, 2),
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=8 * 6 + 32,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
        vae = _vae()
        vae.register_to_config(scaling_factor=0.13025)
        pred = prediction_type or "epsilon"
    else:
        raise ValueError(f"unknown family {family!r}; expected sd1, sd2 or sdxl")
    for m in [unet, vae, *tes]:
        m.eval().requires_grad_(False)
    return SDModel(family=family, prediction_type=pred, unet=unet, vae=vae, text_encoders=tes,
                   tokenizers=tokenizers_for_family(family), source="", source_hash=f"tiny-{family}-{seed}")


def sd15_vae():
    """The SD 1.x/2.x VAE architecture (83.7M parameters), random init."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)


def sd15_text_encoder():
    """CLIP ViT-L/14's text tower (123M parameters), random init."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=1))


def build_random_sd15(seed: int = 0, unet: str = "full", prediction_type: str = "epsilon") -> SDModel:
    """The SD1.5 architecture with random weights (benchmarks and opt-in checks).

    unet="full": SD1.5's own UNet (860M; ~1.07B parameters in all). unet="reduced": two levels at 320/640 channels
    (~100M) that keep what loaders detect as SD1.5 (320 model channels, 768 context, conv projections), with the
    real VAE and CLIP-L: for checks where the UNet's size only costs time. unet="three_levels": the same with a
    third level at 1280 channels (~316M; issue 21.4's CPU proxy).
    """
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if unet == "full":
        net = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # diffusers' SD1.5
    elif unet == "reduced":
        net = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
                                   block_out_channels=(320, 640), cross_attention_dim=768, attention_head_dim=8,
                                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    elif unet == "three_levels":      # ~316M: the reduced UNet with SD1.5's third level (1280, no attention)
        net = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
                                   block_out_channels=(320, 640, 1280), cross_attention_dim=768, attention_head_dim=8,
                                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    else:
        raise ValueError(f"unet={unet!r}: choose 'full', 'reduced' or 'three_levels'")
    model = SDModel(family="sd1", prediction_type=prediction_type, unet=net, vae=sd15_vae(),
                    text_encoders=[sd15_text_encoder()], tokenizers=tokenizers_for_family("sd1"),
                    source_hash=f"random-sd15-{unet}-{seed}")
    for m in model.modules():
        m.eval().requires_grad_(False)
    return model


__all__ = ["build_tiny_model", "build_random_sd15", "sd15_vae", "sd15_text_encoder", "SD_NOISE_SCHEDULE"]
