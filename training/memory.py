"""VRAM estimator (the performance wizard that chooses settings with it is wizard.py).

`estimate(model, settings, resolution, batch)` returns the accelerator memory a training run needs, per part, in
bytes. `model` is an SDModel, or a family size keyword ("sd15", "sd2", "sdxl"): then the architecture is built on
the meta device (no weights, no memory) and only its tensor shapes are read.

What is exact and what is estimated
-----------------------------------
Exact (computed from the tensor shapes the trainer builds; tests compare them with real tensors and real
optimizer states on the CPU):
- weights: trained tensors in `weights_dtype` (fp32 = the master copy itself: the trainer keeps no second copy;
  bf16 = no fp32 copy at all), frozen UNet / trained-model parts in the frozen dtype (`frozen_dtype`: auto = the
  compute precision's half type, fp8 = 1 byte for frozen Linear / Conv2d weights of the UNet),
- gradients: one per trained tensor in its dtype; with `fused_backward` twice the largest single tensor's (each
  gradient is freed as soon as its weight is stepped, but autograd makes the next one while the largest is being
  stepped) as `details["gradients_held"]`; `parts["gradients"]` are those of the peak moment (for a fused full
  fine-tune the peak is the largest tensor's step, whose bf16 gradient is by then the step's fp32 copy: 0),
- optimizer: AdamW 2 x fp32 moments + a 4-byte step tensor per tensor; AdamW8bit / Lion8bit (bitsandbytes) 1 byte
  per moment + one fp32 absmax per block of `BNB_BLOCK` elements for tensors of >= 4096 elements (smaller ones
  keep fp32 moments, as bitsandbytes does); Lion 1 x fp32; Adafactor (transformers, beta1 None) a row and a
  column vector for tensors of >= 2 dimensions (a conv kernel as the matrix out x in*k*k), a full second moment
  for 1-D ones (+ its 0-d RMS tensor); SGD one momentum buffer
  (none when sgd_momentum is 0); Prodigy exp_avg, exp_avg_sq, s and p0 (4 x fp32). With weights_dtype bf16 the
  state is fp32 (fused.py computes every update in fp32),
- ema: an fp32 copy of the trained UNet tensors (0 on the accelerator with ema_on_cpu),
- text_encoders / vae: frozen encoders and the VAE while they stay on the accelerator (the trainer moves the
  VAE off once latents are cached, and frozen text encoders once embeddings are cached, unless prior_mode is
  base_model).
Estimated (marked in `Estimate.estimated`):
- activations: see `activation_bytes` (calibration and its sources there),
- weight_casts: autocast keeps a half-precision cast of every fp32 trained weight during the forward/backward
  (torch's autocast weight cache), 2 bytes per trained parameter; 0 with weights_dtype bf16 or no mixed precision,
- overhead: CUDA context, cuBLAS/cuDNN workspaces and allocator fragmentation, a constant (`OVERHEAD_BYTES`).

`wizard.choose_settings(...)` is the wizard: see its docstring for the order in which savings are applied.
`estimate_report(...)` is the estimate as text against a device's memory (devices.py reads it), WARNING first when it
does not fit: the `comfyui-dreambooth estimate` output, and through `settings_estimate_text` (which never raises)
the settings nodes' memory_estimate output.
This module imports torch and diffusers only inside functions that need them (CLI --help stays instant).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from .devices import GB, DeviceMemory, PartBytes, read_device
from .memory_activations import base_layer, numel, optimizer_step_temp, step_peak, units_cached

BNB_BLOCK = 256            # bitsandbytes Optimizer8bit.init_state, block_wise: one fp32 absmax per 256 elements
BNB_MIN_8BIT_SIZE = 4096   # bitsandbytes' min_8bit_size default: smaller tensors keep fp32 state
OVERHEAD_BYTES = int(0.8 * GB)   # CUDA context (~300-500 MB) + workspaces + fragmentation (estimate)
FAMILY_KEYWORDS = {"sd15": "sd1", "sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
PARTS = ("weights", "gradients", "optimizer", "ema", "weight_casts", "activations", "temporaries", "text_encoders",
         "vae", "overhead")
ESTIMATED_PARTS = frozenset({"activations", "weight_casts", "temporaries", "overhead"})


# ------------------------------------------------------------------------------------------------------------
# The model's shapes
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ModelShape:
    """The modules of a model (real or on the meta device): all the estimator reads is their tensor shapes."""
    family: str
    unet: object
    text_encoders: list
    vae: object


def _meta_model(family: str) -> ModelShape:
    """The family's real architecture (diffusers / transformers configs of SD1.5, SD2.x, SDXL) on the meta device."""
    return _meta_model_cached(family)


@functools.lru_cache(maxsize=None)
def _meta_model_cached(family: str) -> ModelShape:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .models.tiny import VOCAB, sd15_text_encoder, sd15_vae

    def open_clip(hidden, inter, layers, heads, projection=False):
        cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu",
                             projection_dim=hidden, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)

    with init_empty_weights():
        vae = sd15_vae()
        if family == "sd1":       # runwayml/stable-diffusion-v1-5: diffusers' UNet defaults + CLIP ViT-L/14
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
            tes = [sd15_text_encoder()]
        elif family == "sd2":     # stabilityai/stable-diffusion-2-1: OpenCLIP ViT-H text tower (23 layers used)
            unet = UNet2DConditionModel(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                        use_linear_projection=True)
            tes = [open_clip(1024, 4096, 23, 16)]
        elif family == "sdxl":    # stabilityai/stable-diffusion-xl-base-1.0: CLIP-L + OpenCLIP bigG
            unet = UNet2DConditionModel(
                sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
            tes = [sd15_text_encoder(), open_clip(1280, 5120, 32, 20, projection=True)]
        else:
            raise ValueError(f"unknown family {family!r}; expected sd1, sd2 or sdxl")
    return ModelShape(family, unet, tes, vae)


def model_shape(model) -> ModelShape:
    """An SDModel, a ModelShape, or a family keyword (sd15 / sd1 / sd2 / sdxl) -> ModelShape."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        key = model.strip().lower()
        if key not in FAMILY_KEYWORDS:
            raise ValueError(f"model {model!r}: give an SDModel or one of {', '.join(FAMILY_KEYWORDS)}")
        return _meta_model(FAMILY_KEYWORDS[key])
    return ModelShape(model.family, model.unet, list(model.text_encoders), model.vae)


def _adapter_shapes(module, lora_type: str, rank: int) -> list[tuple]:
    """Shapes of the tensors peft adds to one Linear / Conv2d for `lora_type` at `rank`.

    lora: A (r, in[, k, k]) and B (out, r[, 1, 1]); dora: + a magnitude vector (out,); loha: two Hadamard factor
    pairs (out, r) + (r, in*k*k). lokr is counted as lora (an estimate: its Kronecker factors depend on peft's
    factorisation of the shape)."""
    import torch.nn as nn

    m = base_layer(module)
    if isinstance(m, nn.Conv2d):
        out_f, in_f, kh, kw = m.weight.shape
        a, b = (rank, in_f, kh, kw), (out_f, rank, 1, 1)
        fan_in = in_f * kh * kw
    else:
        out_f, in_f = m.weight.shape
        a, b = (rank, in_f), (out_f, rank)
        fan_in = in_f
    if lora_type == "loha":
        return [(out_f, rank), (rank, fan_in)] * 2
    if lora_type == "dora":
        return [a, b, (out_f,)]
    return [a, b]


@dataclass
class TensorPlan:
    """What the trainer would hold: trained tensor shapes, frozen parameters per place."""
    trained_unet: list = field(default_factory=list)        # shapes
    trained_te: list = field(default_factory=list)
    frozen_unet: list = field(default_factory=list)         # (numel, fp8-eligible)
    frozen_te: list = field(default_factory=list)           # numel per frozen encoder (whole encoders)
    te_partly_frozen: int = 0                               # frozen params inside trained encoders (norms)
    vae: int = 0
    approximate: list = field(default_factory=list)


def plan_tensors(model, settings) -> TensorPlan:
    """The trained and frozen tensors of `settings` (resolved) on `model`."""
    import torch.nn as nn

    from .setup.adapters import text_encoder_target_names, unet_target_names

    shape = model_shape(model)
    s = settings
    trains_te = s.trains_text_encoder
    plan = TensorPlan(vae=sum(p.numel() for p in shape.vae.parameters()))
    if s.use_lora:
        if s.lora_type == "lokr":
            plan.approximate.append("weights (lokr counted as lora)")
        targets = set(unet_target_names(shape.unet, s.lora_unet_targets)) if s.train_unet else set()
        for name, m in shape.unet.named_modules():
            if name in targets:
                plan.trained_unet += _adapter_shapes(m, s.lora_type, s.lora_rank)
        for name, p in shape.unet.named_parameters():
            if ".lora_" in name or ".hada_" in name or ".lokr_" in name or "lora_magnitude" in name:
                continue            # an SDModel carrying adapters already: its own adapter tensors are not base
            plan.frozen_unet.append((p.numel(), False))
        _mark_fp8(shape.unet, plan)
        for te in shape.text_encoders:
            n = sum(p.numel() for p in te.parameters())
            if trains_te:
                tnames = set(text_encoder_target_names(te, s.lora_text_encoder_targets))
                for name, m in te.named_modules():
                    if name in tnames:
                        plan.trained_te += _adapter_shapes(m, s.lora_type, s.lora_rank)
                plan.te_partly_frozen += n          # the base encoder stays, frozen, where the adapter runs
            else:
                plan.frozen_te.append(n)
        return plan
    if s.train_unet:
        plan.trained_unet = [tuple(p.shape) for p in shape.unet.parameters()]
    else:
        plan.frozen_unet = [(p.numel(), False) for p in shape.unet.parameters()]
        _mark_fp8(shape.unet, plan)
    for te in shape.text_encoders:
        if not trains_te:
            plan.frozen_te.append(sum(p.numel() for p in te.parameters()))
            continue
        for name, p in te.named_parameters():
            norm = "layer_norm" in name or "final_layer_norm" in name
            if s.freeze_clip_norm and norm:
                plan.te_partly_frozen += p.numel()
            else:
                plan.trained_te.append(tuple(p.shape))
    del nn
    return plan


def _mark_fp8(unet, plan: TensorPlan) -> None:
    """Which frozen UNet parameters fp8 storage would hold in float8: weights of Linear / Conv2d layers whose
    parameters are all frozen (precision.apply_fp8_storage). Rebuilds plan.frozen_unet in parameter order."""
    import torch.nn as nn

    fp8_ids = set()
    for m in unet.modules():
        if type(m) in (nn.Linear, nn.Conv2d) and not any(
                n.startswith(("lora_", "hada_", "lokr_")) for n, _ in m.named_parameters()):
            fp8_ids.add(id(m.weight))
    plan.frozen_unet = [(p.numel(), id(p) in fp8_ids) for name, p in unet.named_parameters()
                        if not any(t in name for t in (".lora_", ".hada_", ".lokr_", "lora_magnitude"))]


# ------------------------------------------------------------------------------------------------------------
# Bytes per part
# ------------------------------------------------------------------------------------------------------------
def _half_bytes(settings) -> int:
    return 4 if settings.mixed_precision == "no" else 2


def frozen_bytes_per_param(settings) -> int:
    """Bytes of a frozen parameter on the accelerator (not fp8 storage): precision.frozen_weight_dtype."""
    if settings.frozen_dtype in ("bf16", "fp16"):
        return 2
    return _half_bytes(settings)


def optimizer_state_bytes(shape, settings) -> int:
    """Bytes of the optimizer state of one trained tensor of `shape` (see the module docstring)."""
    n = numel(shape)
    name = settings.optimizer
    if name == "AdamW":
        return 8 * n + 4                        # exp_avg, exp_avg_sq (fp32) + the step tensor (fp32 scalar)
    if name == "SGD":
        return 4 * n if settings.sgd_momentum > 0 else 0
    if name == "Lion":
        return 4 * n                            # exp_avg
    if name == "Prodigy":
        return 16 * n                           # exp_avg, exp_avg_sq, s, p0
    if name in ("AdamW8bit", "Lion8bit"):
        moments = 2 if name == "AdamW8bit" else 1
        if n < BNB_MIN_8BIT_SIZE:
            return 4 * n * moments
        blocks = -(-n // BNB_BLOCK)
        return moments * (n + 4 * blocks)       # uint8 moments + fp32 absmax per block
    if name == "Adafactor":
        if len(shape) > 2:                      # stepped as the matrix (out, in*k*k): setup/optimizers.py
            shape = (int(shape[0]), numel(shape[1:]))
        if len(shape) >= 2:                     # factored: exp_avg_sq_row shape[:-1], exp_avg_sq_col shape[:-2]+[-1]
            return 4 * (numel(shape[:-1]) + numel(shape[:-2]) * int(shape[-1])) + 4
        return 4 * n + 4                        # exp_avg_sq; + "RMS" (a 0-d fp32 tensor after the first step)
    raise ValueError(f"optimizer {name!r} is not known to the estimator")


@dataclass
class Estimate(PartBytes):
    """Bytes per part (`parts`, keys PARTS), the total, and the facts behind them (`details`)."""
    parts: dict
    details: dict
    estimated: frozenset = ESTIMATED_PARTS

    def table(self) -> str:
        lines = [f"{k:<14}{_amount(v)}{'  (estimate)' if k in self.estimated else ''}" for k, v in self.parts.items()]
        lines.append(f"{'total':<14}{self.total / GB:8.2f} GB")
        return "\n".join(lines)


def _amount(size: int) -> str:
    """A table cell: GB, or MB for the parts of a tiny model that would all read "0.00 GB"; nothing is "0 GB"."""
    if size == 0:
        return f"{'0':>8} GB"
    if 0 < size < 0.005 * GB:
        return f"{size / 1024 ** 2:8.1f} MB"
    return f"{size / GB:8.2f} GB"


def estimate(model, settings, resolution: int | None = None, batch: int | None = None,
             concepts=()) -> Estimate:
    """Accelerator memory of training `model` with `settings`, per part (bytes). resolution / batch default to
    the settings' own (data.resolution, batch_size); auto settings are resolved with `concepts`."""
    s = settings if settings.is_resolved else settings.resolved(concepts)
    resolution = resolution or s.data.resolution
    batch = batch or s.batch_size
    plan = plan_tensors(model, s)
    trained = plan.trained_unet + plan.trained_te
    wbytes = 2 if s.weights_dtype == "bf16" else 4
    n_trained = sum(numel(t) for t in trained)
    fb = frozen_bytes_per_param(s)
    frozen_unet = sum(n * (1 if (fp8 and s.frozen_dtype == "fp8") else fb) for n, fp8 in plan.frozen_unet)
    if not s.use_lora and s.train_unet and s.prior_mode == "base_model":
        # the received UNet stays on the accelerator to give the base model's prediction
        frozen_unet += sum(numel(t) for t in plan.trained_unet) * fb
    te_partly = plan.te_partly_frozen * fb
    weights = n_trained * wbytes + frozen_unet + te_partly
    if s.fused_backward:      # the largest gradient and the one autograd makes next (the accounting sees both)
        gradients = 2 * max((numel(t) for t in trained), default=0) * wbytes
    else:
        gradients = n_trained * wbytes
    optimizer = sum(optimizer_state_bytes(t, s) for t in trained)
    ema = 0
    if s.use_ema and s.train_unet and not s.ema_on_cpu:
        ema = 4 * sum(numel(t) for t in plan.trained_unet)
    casts = 2 * n_trained if (s.weights_dtype == "fp32" and s.mixed_precision != "no") else 0
    # the peak moment (issue 21.3): which gradients, activations, casts and temporaries exist at once
    peak = step_peak(model_shape(model), s, resolution, batch, sum(numel(t) for t in plan.trained_unet) * wbytes,
                     gradients, optimizer_step_temp(trained, s), casts)
    # the parts are those of the peak moment: the gradients that exist then (all of them when the optimizer step is
    # the peak; few or none early in the backward; a full fine-tune's fused_backward: the stepped tensor's, none
    # in bf16, whose gradient becomes the step's fp32 copy; LoRA's: the two at once); what the optimizer step
    # holds is details["gradients_held"] (exact). The step's scratch is counted with the temporaries
    gradients_held = gradients
    if not s.fused_backward or (s.train_unet and not s.use_lora):
        gradients = peak["gradients"]
    casts = peak["weight_casts"]
    if s.frozen_dtype == "fp8":     # fp8 layers are cast to the compute dtype, and the casts that backward needs are
        # kept: every layer's without checkpointing, the layers outside the checkpointed blocks' with it
        fp8 = sum(n for n, eligible in plan.frozen_unet if eligible)
        if s.gradient_checkpointing:
            units, _ = units_cached(id(model_shape(model).unet), model_shape(model).unet, 8)
            fp8 = min(fp8, sum(u.get("unckpt", 0) for u in units))
        casts += 2 * fp8
    text_cached = s.data.cache_text_embeds
    te_resident = (not text_cached) or s.prior_mode == "base_model"
    text_encoders = sum(plan.frozen_te) * fb if te_resident else 0
    vae_bytes = {"fp32": 4, "fp16": 2, "bf16": 2}[s.vae_dtype]
    vae = 0 if s.data.cache_latents else plan.vae * vae_bytes
    # the step's scratch: inside optimizer.step() (the peak moment of a full fine-tune without fused_backward) it
    # is the optimizer's, as torch's MemTracker tags it; fused_backward's is made in the backward: a temporary
    step_scratch = peak["optimizer_temp"]
    parts = {"weights": weights, "gradients": gradients,
             "optimizer": optimizer + (0 if s.fused_backward else step_scratch), "ema": ema, "weight_casts": casts,
             "activations": peak["activations"],
             "temporaries": peak["temporaries"] + (step_scratch if s.fused_backward else 0),
             "text_encoders": text_encoders,
             "vae": vae, "overhead": OVERHEAD_BYTES}
    details = {"trained_params": n_trained, "trained_tensors": len(trained),
               "frozen_unet_params": sum(n for n, _ in plan.frozen_unet),
               "frozen_text_encoder_params": sum(plan.frozen_te), "vae_params": plan.vae,
               "gradients_held": gradients_held, "optimizer_held": optimizer, "resolution": resolution, "batch": batch,
               "approximate": plan.approximate}
    return Estimate(parts, details)


# ------------------------------------------------------------------------------------------------------------
# The estimate of a config, as text (the settings nodes' memory_estimate output and `comfyui-dreambooth estimate`)
# ------------------------------------------------------------------------------------------------------------
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
DEFAULT_FAMILY = "sd15"       # what a settings node estimates for when no model is connected
TIGHT_FRACTION = 0.9          # above this share of the card: a note that the estimate is close to the limit
WIZARD_HINT = "the DreamBooth Performance Wizard node (or `comfyui-dreambooth wizard`)"
ESTIMATE_NOTE = ("activations, weight_casts and temporaries are derived from the UNet's architecture and checked "
                 "against an accounting of the real training step (totals within 5% for SD1.5 / SD2 / SDXL, LoRA / "
                 "full, batch 1-4; activations within 10%); "
                 "overhead (CUDA context, allocator, kernel workspaces) is a guess not yet measured on a GPU; "
                 "weights, gradients, optimizer, ema, text_encoders and vae are exact for these settings")


def _what(shape: ModelShape, s) -> str:
    if s.use_lora:
        mode = f"{s.lora_type} rank {s.lora_rank}"
    else:
        mode = "full fine-tune"
    trains = [name for name, on in (("UNet", s.train_unet), ("text encoder", s.trains_text_encoder)) if on]
    return (f"{mode} of {' + '.join(trains) or 'nothing'}, {s.data.resolution}px, batch {s.batch_size}, "
            f"{s.optimizer}, mixed_precision {s.mixed_precision}, gradient_checkpointing "
            f"{'on' if s.gradient_checkpointing else 'off'}")


def estimate_report(model, settings, device: DeviceMemory | None = None, *, device_label: str = "",
                    model_label: str = "") -> str:
    """The memory estimate of `settings` on `model` (an SDModel or a family keyword) as text: the parts and the
    total, compared with `device` (DeviceMemory, or None: no accelerator; `device_label` names what was found).
    `model_label` names the model in the text (default: its family).

    When the total exceeds the device's memory, the first line is a WARNING naming the total, the device's
    memory and the largest parts, and pointing to the wizard. Raises what estimate() raises."""
    shape = model_shape(model)
    s = settings if settings.is_resolved else settings.resolved()
    est = estimate(shape, s)
    model_label = model_label or f"an {FAMILY_NAMES.get(shape.family, shape.family)} model"
    total_gb = est.total / GB
    largest = sorted(((v, k) for k, v in est.parts.items() if v > 0), reverse=True)[:3]
    largest_text = ", ".join(f"{k} {v / GB:.2f} GB" for v, k in largest)
    lines = []
    if device is not None and est.total > device.total:
        savers = ("Imagic trains with the plain step, so: gradient_checkpointing, an 8-bit optimizer, a smaller "
                  "resolution, LoRA (use_lora)" if s.train_imagic_only else "gradient_checkpointing, an 8-bit "
                  "optimizer, fused_backward, a smaller batch or resolution, LoRA")
        lines.append(f"WARNING: these settings need about {total_gb:.2f} GB but {device.name} has "
                     f"{device.total / GB:.2f} GB: training will run out of memory. Largest parts: {largest_text}. "
                     f"Turn on memory savings ({savers}), or use {WIZARD_HINT} to choose settings that fit.")
    lines.append(f"Memory estimate for {model_label}: {_what(shape, s)}")
    if s.train_imagic_only:
        lines.append("(Imagic is counted as DreamBooth training with these settings: an approximation.)")
    lines.append(est.table())
    if device is None:
        lines.append(f"device: {device_label or 'no accelerator found'}; nothing to compare with.")
    else:
        free = f", {device.free / GB:.2f} GB free now" if device.free is not None else ""
        lines.append(f"device: {device.name}, {device.total / GB:.2f} GB{free}.")
        if est.total <= device.total:
            verdict = f"fits, {(device.total - est.total) / GB:.2f} GB to spare"
            if est.total > TIGHT_FRACTION * device.total:
                verdict += (f" - tight: within {100 - int(TIGHT_FRACTION * 100)}% of the card's memory and the "
                            f"overhead is a guess; {WIZARD_HINT} can choose settings with more room")
            lines.append(verdict + ".")
    lines.append(ESTIMATE_NOTE + ".")
    return "\n".join(lines)


def settings_estimate_text(model, settings, device) -> str:
    """The settings nodes' memory_estimate text; never raises (a settings node must still return its config).

    `model`: the connected SDModel, or None: estimated for DEFAULT_FAMILY and the text says so. `device`: the
    torch device training will use (its memory is read here), a DeviceMemory, or None (not known)."""
    label = "" if model is not None else ("SD1.5 (no model connected to this node: connect the base model for "
                                          "its own numbers)")
    try:
        memory, found = read_device(device)
    except Exception as e:      # noqa: BLE001 - still show the estimate, without the comparison
        memory, found = None, f"{device}, its memory could not be read ({type(e).__name__}: {e})"
    try:
        return estimate_report(DEFAULT_FAMILY if model is None else model, settings, memory, device_label=found,
                               model_label=label)
    except Exception as e:      # noqa: BLE001 - the estimate is a courtesy; the config is what the node is for
        return f"No memory estimate for these settings: {type(e).__name__}: {e}"
