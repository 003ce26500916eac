"""The model that trains: a copy of what training changes (the received model is never modified), the trainable
tensors by name (what a checkpoint holds), the attention kernel, and the finished model handed back.

ComfyUI loads weights as inference tensors, which autograd refuses: every module that trains, or that training
backpropagates through, is a copy made outside inference mode.
"""
from __future__ import annotations

import contextlib
import copy


def build_trainable(model, settings):
    """(trained model, unet params, text-encoder params). The received model is never modified: every module
    that trains, or that training must change (attention kernel, dtype), is a copy; frozen ones are shared."""
    from .adapters import adapter_parameters, add_adapters
    from .precision import cast_trained, trained_weight_dtype

    trains_te = settings.trains_text_encoder
    if settings.use_lora:
        with _no_inference():
            tm = add_adapters(model, rank=settings.lora_rank, alpha=settings.lora_alpha, dropout=settings.lora_dropout,
                              lora_type=settings.lora_type, on_unet=settings.train_unet, on_text_encoder=trains_te,
                              seed=settings.seed, unet_targets=settings.lora_unet_targets,
                              text_encoder_targets=settings.lora_text_encoder_targets)
        unet_params = adapter_parameters(tm, unet=True, text_encoders=False) if settings.train_unet else []
        te_params = adapter_parameters(tm, unet=False, text_encoders=True) if trains_te else []
        cast_trained([*unet_params, *te_params], trained_weight_dtype(settings))   # weights_dtype (fp32 / bf16)
        return _own_frozen_unet_if_needed(tm, model, settings), unet_params, te_params
    # trained weights are fp32 master copies whatever precision the model was loaded in: a bf16 weight cannot
    # take a 1e-6 step (it rounds back), and fp16 gradients cannot be unscaled; autocast computes in half
    # (or bf16 with weights_dtype = bf16: the optimizer then rounds each update stochastically, setup/fused.py)
    wdt = trained_weight_dtype(settings)
    unet = trainable_copy(model.unet, wdt) if settings.train_unet else model.unet
    tes = [trainable_copy(te, wdt) for te in model.text_encoders] if trains_te else list(model.text_encoders)
    unet_params, te_params = [], []
    if settings.train_unet:
        unet.requires_grad_(True)
        unet_params = list(unet.parameters())
    if trains_te:
        for te in tes:
            for name, p in te.named_parameters():
                norm = "layer_norm" in name or "final_layer_norm" in name
                p.requires_grad_(not (settings.freeze_clip_norm and norm))
                if p.requires_grad:
                    te_params.append(p)
    tm = model.replace(unet=unet, text_encoders=tes, ema_unet=None)
    return _own_frozen_unet_if_needed(tm, model, settings), unet_params, te_params


def with_data_vae(model, dtype):
    """`model`, with its VAE in `dtype` (a frozen copy when it is not already): the VAE that encodes the training
    latents and decodes previews has the vae_dtype setting's precision, because fp16 VAEs give NaN / black images
    (a half-precision model's VAE is copied to fp32 unless asked otherwise)."""
    if model.vae.dtype == dtype:
        return model
    return model.replace(vae=trainable_copy(model.vae, dtype).requires_grad_(False))


def _own_frozen_unet_if_needed(tm, model, settings):
    """A frozen UNet stays shared with the received model, unless training must change it (another attention
    kernel) or backpropagate through it (text encoder training) while it holds inference tensors, which
    autograd refuses to save for backward (ComfyUI loads models under torch.inference_mode())."""
    if tm.unet is not model.unet:
        return tm
    backprop = settings.trains_text_encoder
    if settings.attention != "sdpa" or (backprop and has_inference_tensors(model.unet)):
        return tm.replace(unet=trainable_copy(model.unet).requires_grad_(False))
    return tm


def has_inference_tensors(module) -> bool:
    return any(t.is_inference() for t in module.parameters()) or any(t.is_inference() for t in module.buffers())


def owned_modules(tm, model) -> list:
    """The UNet / text encoders of `tm` that are training's own copies (never the received model's)."""
    received = [model.unet, *model.text_encoders]
    return [m for m in (tm.unet, *tm.text_encoders) if not any(m is r for r in received)]


@contextlib.contextmanager
def _no_inference():
    import torch

    with torch.inference_mode(False):
        yield


def named_trainables(tm, unet_params, te_params) -> dict:
    ids = {id(p) for p in [*unet_params, *te_params]}
    out = {}
    for part, module in [("unet", tm.unet), *[(f"te{i}", te) for i, te in enumerate(tm.text_encoders)]]:
        for name, p in module.named_parameters():
            if id(p) in ids:
                out[f"{part}.{name}"] = p
    return out


def trainable_copy(module, dtype=None):
    """A deep copy made outside inference mode: ComfyUI loads weights as inference tensors, which autograd
    refuses; the copy's tensors are ordinary ones. With `dtype`, its floating-point tensors are made in `dtype`
    directly (as `.to(dtype)` would leave them), never as a full copy in the source's precision first."""
    import torch

    with torch.inference_mode(False), torch.no_grad():
        copies = {}
        for t in [*module.parameters(), *module.buffers()] if dtype is not None else []:
            if t.is_floating_point() and t.dtype != dtype and id(t) not in copies:
                c = t.detach().to(dtype, copy=True)
                copies[id(t)] = torch.nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(
                    t, torch.nn.Parameter) else c
        return copy.deepcopy(module, copies)


def set_attention(unet, attention: str):
    if attention == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as e:  # diffusers raises ModuleNotFoundError / ValueError depending on the cause
            raise ValueError(f"attention = xformers: {e}. Install xformers matching your torch, or use sdpa") from None
    elif attention == "sliced":
        unet.set_attention_slice("auto")
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


@contextlib.contextmanager
def adapters_disabled(module):
    """Run a peft-adapted module as its frozen base (prior preservation from the base model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def finish_model(tm, model, named, settings, ema_state, run_id):
    """The trained SDModel: eval mode, no grads, EMA copy attached when trained with EMA. Modules still shared
    with the received `model` are left as they are."""
    import torch

    ema_unet = None
    if ema_state is not None:
        from .ema import EMA

        with torch.no_grad():
            ema = EMA(tm.unet, settings.ema_decay) if any(p.requires_grad for p in tm.unet.parameters()) else None
            if ema is not None:
                ema.load_state_dict(ema_state)
                ema_unet = ema.averaged_copy(tm.unet)
    for m in owned_modules(tm, model):
        m.eval().requires_grad_(False)
    if ema_unet is not None:
        ema_unet.eval().requires_grad_(False)
    metadata = dict(tm.metadata)
    metadata["training"] = settings.result_dict()
    metadata["trained_run_id"] = run_id          # names these weights if they are trained further
    return tm.replace(ema_unet=ema_unet, metadata=metadata,
                      zero_terminal_snr=bool(tm.zero_terminal_snr or settings.zero_terminal_snr))
