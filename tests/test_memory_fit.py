"""Issue 21.3: the estimator (training/memory.py) held to the accounting (training/memory_measure.py: one real
training step on fake tensors) per part, on a small SD-layout UNet in CI time. The full-size grid (SD1.5 / SD2 /
SDXL) is `python bench/memory.py --grid` (cached in bench/results/memory-grid.json; README "Memory settings").

The UNet: SD1.5's layout at a tenth of its width (block_out_channels 64/128/128, two layers per block,
CrossAttnDownBlock2D x2 + DownBlock2D, the cross-attention mid block, UpBlock2D + CrossAttnUpBlock2D x2, conv
projections, cross-attention on 77 tokens of 64 channels) and a variant with SD2 / SDXL's linear projections and two
transformer layers per block, at 128 px (64 x 64 latents with the tiny VAE: SD1.5's token count at 512 px), so
activations are tens of MB. Each part is held within 10 % of the accounting; a part below SMALL_MB on both sides
(the tiny model's weights and optimizer state are a few MB, LoRA gradients and some temporaries near 0) is held
to an absolute SMALL_MB instead, since a ratio of two near-zero numbers says nothing about the full-size model."""
import pytest

from trainer_fixtures import tiny_settings

pytestmark = pytest.mark.usefixtures("single_thread")

MB = 2 ** 20
REL = 0.10
SMALL_MB = 4
RESOLUTION = 128
PARTS = ("weights", "gradients", "optimizer", "activations", "temporaries")


def _small_sd_model(linear: bool):
    import torch
    from diffusers import UNet2DConditionModel

    from comfyui_dreambooth.training.models import build_tiny_model

    torch.manual_seed(0)
    kw = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128),
              cross_attention_dim=64, attention_head_dim=8,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    if linear:
        kw |= dict(use_linear_projection=True, attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 2, 2))
    unet = UNet2DConditionModel(**kw).eval().requires_grad_(False)
    return build_tiny_model("sd1").replace(unet=unet, source_hash=f"small-sd-{'linear' if linear else 'conv'}")


CONFIGS = {
    "lora-ckpt-b1": dict(use_lora=True, gradient_checkpointing=True),
    "lora-no-ckpt-b1": dict(use_lora=True, gradient_checkpointing=False),
    "lora-ckpt-b2": dict(use_lora=True, gradient_checkpointing=True, batch_size=2),
    "full-ckpt-b1": dict(use_lora=False, gradient_checkpointing=True),
    "full-no-ckpt-b1": dict(use_lora=False, gradient_checkpointing=False),
    "full-ckpt-b2": dict(use_lora=False, gradient_checkpointing=True, batch_size=2),
    "linear-lora-ckpt-b1": dict(use_lora=True, gradient_checkpointing=True),
}
# config: why the estimate is still off there (strict xfail: a fix makes it pass, and shows). Both are the full
# fine-tune's backward walk (training/memory_activations.py step_peak), whose constants were fitted on SD1.5 at
# 512 px, where weights, gradients and optimizer state (13 GB) dwarf activations; on this small model activations
# dominate and the walk's simplifications show (README "Memory settings", what is still off). (full-ckpt-b1,
# activations 1.16x, passes since a recomputed block's backward is counted without ff.net.2's freed input: 1.04x.)
OFF = {
    "full-no-ckpt-b1": "temporaries 13.0 vs 7.0 MB: BACKWARD_WORKING (52 bytes per channel x token, fitted with "
                       "checkpointing) is too large without it (SD1.5 full without checkpointing: 0.66x, the other "
                       "way)",
    "full-ckpt-b2": "the estimate's peak is the wrong moment: it puts the first recomputation's activations and the "
                    "backward's working set at once (activations 77 vs 33 MB, gradients 0.35 vs 31 MB); the "
                    "accounting's peak is the end of the backward, whose total the estimate comes within 7 % of",
}


def _compare(name):
    from comfyui_dreambooth.training.memory import estimate
    from comfyui_dreambooth.training.memory_measure import measure

    model = _small_sd_model(linear=name.startswith("linear"))
    settings = tiny_settings(optimizer="AdamW", mixed_precision="bf16", lora_rank=16, lora_alpha=16.0,
                             **CONFIGS[name])
    acc = measure(model, settings, resolution=RESOLUTION, loaded_dtype="fp16").parts
    p = estimate(model, settings, resolution=RESOLUTION).parts
    # the accounting counts autocast's weight casts as activations; text encoders / VAE are cached (0), the
    # overhead (CUDA context) is what the accounting cannot see
    est = {k: p[k] for k in ("weights", "gradients", "optimizer", "temporaries")}
    est["activations"] = p["activations"] + p["weight_casts"]
    return est, acc


# the default run keeps one LoRA row (about 20 s on one worker, of the README run's 3-minute budget); the others
# (checkpointing off, batch 2, the linear-projection layout, the full fine-tune, the known-off strict xfails) run
# with the slow tests, in CI too
SLOW = {"lora-no-ckpt-b1", "lora-ckpt-b2", "linear-lora-ckpt-b1", "full-ckpt-b1"}


def _param(name):
    marks = [pytest.mark.xfail(reason=OFF[name], strict=True)] if name in OFF else []
    if name in OFF or name in SLOW:
        marks.append(pytest.mark.slow)
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", [_param(n) for n in CONFIGS])
def test_estimate_matches_the_accounting_per_part(name):
    est, acc = _compare(name)
    off = []
    for k in PARTS:
        e, a = est[k], acc[k]
        if max(e, a) < SMALL_MB * MB:
            ok = abs(e - a) <= SMALL_MB * MB
        else:
            ok = abs(e - a) <= REL * a
        if not ok:
            off.append(f"{k}: estimate {e / MB:.2f} MB, accounted {a / MB:.2f} MB")
    total_e, total_a = sum(est.values()), sum(acc[k] for k in PARTS)
    if abs(total_e - total_a) > REL * total_a:
        off.append(f"total: estimate {total_e / MB:.2f} MB, accounted {total_a / MB:.2f} MB")
    assert not off, "; ".join(off)
