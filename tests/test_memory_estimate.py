"""training/memory.py (issue 12): the estimator's exact parts against real tensors and real optimizer states on
the CPU, monotonicity of every VRAM-raising / -lowering setting, the wizard's picks for 4-24 GB cards and the
CLI's JSON shape."""
import json

import pytest
import torch

from trainer_fixtures import tiny_settings

pytestmark = pytest.mark.usefixtures("single_thread")


def _real(model, settings):
    """Trained tensors and optimizer state after one real optimizer step, built by the trainer's own code."""
    from comfyui_dreambooth.training.setup.fused import build_training_optimizer
    from comfyui_dreambooth.training.setup.optimizers import training_param_groups
    from comfyui_dreambooth.training.trainer import build_trainable

    tm, unet_params, te_params = build_trainable(model, settings)
    params = [*unet_params, *te_params]
    opt = build_training_optimizer(training_param_groups(unet_params, te_params, settings), settings)
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p)
        if getattr(opt, "fused", False):     # fused_backward steps inside backward: call its hook as backward would
            opt._hook(p)
    opt.step()
    inner = getattr(opt, "_optimizers", [opt])
    state = sum(t.numel() * t.element_size() for o in inner for st in o.state.values() for t in st.values()
                if torch.is_tensor(t))
    if hasattr(opt, "close"):
        opt.close()
    return tm, params, state


CASES = {
    "lora-adamw": dict(use_lora=True, optimizer="AdamW"),
    "lora-te-adamw": dict(use_lora=True, optimizer="AdamW", text_encoder_ratio=0.5),
    "lora-rank8-attention": dict(use_lora=True, lora_rank=8, lora_unet_targets="attention", optimizer="SGD"),
    "dora": dict(use_lora=True, lora_type="dora", optimizer="AdamW"),
    "loha": dict(use_lora=True, lora_type="loha", optimizer="AdamW"),
    "full-adamw": dict(use_lora=False, optimizer="AdamW"),
    "full-te-adamw": dict(use_lora=False, optimizer="AdamW", text_encoder_ratio=0.5),
    "full-sgd": dict(use_lora=False, optimizer="SGD"),
    "full-sgd-no-momentum": dict(use_lora=False, optimizer="SGD", sgd_momentum=0.0),
    "full-adafactor": dict(use_lora=False, optimizer="Adafactor", text_encoder_ratio=0.5),
    "full-fused-adamw": dict(use_lora=False, optimizer="AdamW", fused_backward=True, max_grad_norm=0.0),
    "full-bf16-adamw": dict(use_lora=False, optimizer="AdamW", weights_dtype="bf16", mixed_precision="bf16"),
    "full-bf16-fused-adafactor": dict(use_lora=False, optimizer="Adafactor", weights_dtype="bf16",
                                      mixed_precision="bf16", fused_backward=True, max_grad_norm=0.0),
    "lora-bf16": dict(use_lora=True, optimizer="AdamW", weights_dtype="bf16", mixed_precision="bf16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_parts_match_real_tensors(sd1, case):
    from comfyui_dreambooth.training.memory import estimate

    settings = tiny_settings(**CASES[case])
    tm, params, state = _real(sd1, settings)
    est = estimate(sd1, settings)
    trained_bytes = sum(p.numel() * p.element_size() for p in params)
    assert est.details["trained_params"] == sum(p.numel() for p in params)
    assert est.details["trained_tensors"] == len(params)
    assert est.parts["optimizer"] == state
    largest = max(p.numel() * p.element_size() for p in params)
    assert est.parts["gradients"] == (largest if settings.fused_backward else trained_bytes)
    # weights: trained in their dtype + every frozen UNet / trained-encoder parameter at the frozen dtype
    fb = 4 if settings.mixed_precision == "no" else 2
    trained_ids = {id(p) for p in params}
    frozen = [p for m in [tm.unet, *(tm.text_encoders if settings.text_encoder_ratio else [])]
              for p in m.parameters() if id(p) not in trained_ids]
    assert est.parts["weights"] == trained_bytes + sum(p.numel() for p in frozen) * fb


def test_frozen_parts_and_ema(sd1):
    from comfyui_dreambooth.training.memory import estimate

    te = sum(p.numel() for te in sd1.text_encoders for p in te.parameters())
    vae = sum(p.numel() for p in sd1.vae.parameters())
    s = tiny_settings(data={"cache_text_embeds": False, "cache_latents": False})
    est = estimate(sd1, s)
    assert est.parts["text_encoders"] == te * 4 and est.parts["vae"] == vae * 4
    cached = estimate(sd1, tiny_settings())
    assert cached.parts["text_encoders"] == 0 and cached.parts["vae"] == 0      # moved off once cached
    assert estimate(sd1, tiny_settings(prior_mode="base_model")).parts["text_encoders"] == te * 4
    full = tiny_settings(use_lora=False, use_ema=True)
    unet = sum(p.numel() for p in sd1.unet.parameters())
    assert estimate(sd1, full).parts["ema"] == 4 * unet
    assert estimate(sd1, full.replace(ema_on_cpu=True)).parts["ema"] == 0


def test_fp8_frozen_weights_counted_per_layer(sd1):
    from comfyui_dreambooth.training.memory import estimate

    s = tiny_settings(mixed_precision="bf16")
    lin = [m.weight.numel() for m in sd1.unet.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]
    auto = estimate(sd1, s).parts["weights"]
    fp8 = estimate(sd1, s.replace(frozen_dtype="fp8")).parts["weights"]
    assert auto - fp8 == sum(lin)          # 2 bytes -> 1 byte for each frozen Linear / Conv2d weight


def test_family_keywords_count_the_real_architectures():
    from comfyui_dreambooth.training.memory import estimate, model_shape
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    counts = {}
    for kw in ("sd15", "sd2", "sdxl"):
        shape = model_shape(kw)
        counts[kw] = sum(p.numel() for p in shape.unet.parameters())
        assert all(p.device.type == "meta" for p in shape.unet.parameters())
    assert 855e6 < counts["sd15"] < 865e6          # SD1.5 UNet: 859.5M
    assert 860e6 < counts["sd2"] < 870e6           # SD2.1 UNet: 865.9M
    assert 2.55e9 < counts["sdxl"] < 2.6e9         # SDXL UNet: 2.567B
    est = estimate("sdxl", DreamBoothSettings(use_lora=False), 1024, 1)
    assert est.parts["optimizer"] > 8 * 2.5e9      # AdamW: two fp32 moments of 2.5B+ parameters
