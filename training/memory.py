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
  stepped: memory_measure.py's accounting sees two at once),
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
import math
from dataclasses import dataclass, field

from .devices import GB, DeviceMemory, PartBytes, read_device

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


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def _base_layer(module):
    """A peft-wrapped layer's original layer (an SDModel that already carries adapters)."""
    return getattr(module, "base_layer", module)


def _adapter_shapes(module, lora_type: str, rank: int) -> list[tuple]:
    """Shapes of the tensors peft adds to one Linear / Conv2d for `lora_type` at `rank`.

    lora: A (r, in[, k, k]) and B (out, r[, 1, 1]); dora: + a magnitude vector (out,); loha: two Hadamard factor
    pairs (out, r) + (r, in*k*k). lokr is counted as lora (an estimate: its Kronecker factors depend on peft's
    factorisation of the shape)."""
    import torch.nn as nn

    m = _base_layer(module)
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
    n = _numel(shape)
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
            shape = (int(shape[0]), _numel(shape[1:]))
        if len(shape) >= 2:                     # factored: exp_avg_sq_row shape[:-1], exp_avg_sq_col shape[:-2]+[-1]
            return 4 * (_numel(shape[:-1]) + _numel(shape[:-2]) * int(shape[-1])) + 4
        return 4 * n + 4                        # exp_avg_sq; + "RMS" (a 0-d fp32 tensor after the first step)
    raise ValueError(f"optimizer {name!r} is not known to the estimator")


# ------------------------------------------------------------------------------------------------------------
# Activations and temporaries, from the UNet's architecture (issue 21.3)
# ------------------------------------------------------------------------------------------------------------
# What one unit of diffusers' UNet2DConditionModel keeps for its backward, in bytes per token (latent pixel) and
# per sample at 2 bytes per element (bf16 / fp16 autocast; x2 without mixed precision). Read off the tensors
# autograd saves (saved_tensors_hooks over the real blocks under autocast, sdpa attention), per block kind:
#   ResnetBlock2D(cin -> cout): x, norm1 out, silu out, h, norm2 out, silu out = 3 x (cin + cout) elements,
#   Transformer2DModel wrapper: conv proj_in/out (SD1.5) 3 x C, linear (SD2 / SDXL) 1 x C (+2 x C when its
#     projections are trained, they then keep their inputs),
#   BasicTransformerBlock: 21 x C (layer norms' inputs, q / k / v / out of both attentions, the GEGLU halves and
#     its output) + 2 x 77 x C (cross-attention keys / values) + per token 4 x heads fp32 (two logsumexps) and
#     6 (layer-norm statistics); a full fine-tune keeps 7 x C more (inputs of trained Linear layers), LoRA keeps a
#     copy of every adapted layer's input (peft casts it to the adapter's dtype: 11 x C for the 'transformer'
#     targets, 6 x C for 'attention', 77 x cross_attention_dim for each of attn2.to_k / to_v) and each adapter's
#     rank-sized intermediate,
#   Downsample2D: its input (1 x C); Upsample2D: the upsampled tensor (4 x C per input token),
#   the stem and head (conv_in, norm_out, conv_out, the batch and loss): 3 x C0 + 4 per top-level token.
# With gradient checkpointing (each ResnetBlock2D and BasicTransformerBlock, non-reentrant) a checkpointed unit
# keeps only its input; the peak is the backward's first recomputation (the last transformer block: all that it
# keeps again) or, for a full fine-tune, the end of the backward (every gradient made, the first blocks'
# activations and their backward's working set; norm_out / conv_out's inputs are freed by then).
# Fitted on the SD1.5 rows of the accounting (bench/memory.py --grid) and checked on the others:
FORWARD_TRANSIENT = 15      # bytes per C0 x token alive at the forward's end / a recomputation's end (GEGLU)
RECOMPUTE_GRAD = 6          # bytes per C0 x token: the output gradient while the first block is recomputed
BACKWARD_WORKING = 52       # bytes per C x token: a transformer block's backward (activation gradients)
CONTEXT_TOKENS = 77


def _unet_units(unet, side: int) -> tuple[list[dict], int]:
    """The UNet's checkpointable units in forward order (ResnetBlock2D, Transformer2DModel, down / upsamplers),
    each with its tokens per sample at `side` x `side` latents, channels, transformer layers and heads, and its
    parameter count; and the tokens at the top level."""
    import torch.nn as nn

    sides = [side]
    for _ in unet.down_blocks:
        sides.append(-(-sides[-1] // 2))
    tokens = [x * x for x in sides]

    def n(m):
        return sum(p.numel() for p in m.parameters())

    def resnet(r, t):
        return dict(kind="resnet", T=t, cin=_base_layer(r.conv1).in_channels, cout=_base_layer(r.conv2).out_channels,
                    params=n(r))

    def attention(a, t):
        blocks = a.transformer_blocks
        proj = _base_layer(a.proj_in)
        c = proj.in_channels if isinstance(proj, nn.Conv2d) else proj.in_features
        return dict(kind="attention", T=t, c=c, layers=len(blocks), heads=blocks[0].attn1.heads,
                    conv=isinstance(proj, nn.Conv2d), params=n(a),
                    unckpt=_base_layer(a.proj_in).weight.numel() + _base_layer(a.proj_out).weight.numel())

    def block(b, t):
        out, atts = [], list(getattr(b, "attentions", None) or [])
        for k, r in enumerate(b.resnets):
            out.append(resnet(r, t))
            if k < len(atts):
                out.append(attention(atts[k], t))
        for sampler, kind in ((getattr(b, "downsamplers", None), "down"), (getattr(b, "upsamplers", None), "up")):
            for d in sampler or []:
                out.append(dict(kind=kind, T=t, c=_base_layer(d.conv).in_channels, params=n(d), unckpt=n(d)))
        return out

    units, levels = [], len(unet.down_blocks)
    for i, b in enumerate(unet.down_blocks):
        units += block(b, tokens[i])
    mid = unet.mid_block
    if mid is not None:
        units.append(resnet(mid.resnets[0], tokens[levels - 1]))
        for a, r in zip(getattr(mid, "attentions", []), mid.resnets[1:]):
            units += [attention(a, tokens[levels - 1]), resnet(r, tokens[levels - 1])]
    for j, b in enumerate(unet.up_blocks):
        units += block(b, tokens[levels - 1 - j])
    return units, tokens[0]


def _layer_bytes(u: dict, mode: str, s, ctx_dim: int) -> int:
    """What one BasicTransformerBlock keeps per sample (bytes at 2 per element; see the table above)."""
    c, t = u["c"], u["T"]
    b = 42 * c * t + 4 * CONTEXT_TOKENS * c + 12 * t
    if s.attention == "sliced":     # each slice's attention probabilities (bf16) are kept for its backward: the
        b += 2 * u["heads"] * t * (t + CONTEXT_TOKENS)      # whole matrices of both attentions, slice by slice
    else:                           # sdpa / xformers: the two logsumexps (fp32), never the matrices
        b += 8 * u["heads"] * t
    if mode == "full":
        b += 14 * c * t
    elif mode == "lora":
        copies, adapted = (11, 8) if s.lora_unet_targets == "transformer" else (6, 6)
        b += 2 * copies * c * t + 4 * CONTEXT_TOKENS * ctx_dim + 2 * s.lora_rank * (adapted * t + 2 * CONTEXT_TOKENS)
    return b


def _wrapper_bytes(u: dict, mode: str, s) -> int:
    c, t = u["c"], u["T"]
    b = (6 if u["conv"] else 2) * c * t
    if mode == "full" and not u["conv"]:
        b += 4 * c * t
    if mode == "lora" and s.lora_unet_targets == "transformer":
        b += 4 * c * t + 4 * s.lora_rank * t
    return b


def _unit_bytes(u: dict, mode: str, s, ctx_dim: int, checkpointed: bool) -> int:
    """What a unit keeps per sample until its backward: all it saves, or with checkpointing its input (and what
    is not checkpointed: a Transformer2DModel's norm and projections, the samplers)."""
    t, kind = u["T"], u["kind"]
    if kind == "resnet":
        return 2 * u["cin"] * t if checkpointed else 6 * (u["cin"] + u["cout"]) * t
    if kind == "down":
        return 2 * u["c"] * t
    if kind == "up":
        return 8 * u["c"] * t
    per_layer = 2 * u["c"] * t if checkpointed else _layer_bytes(u, mode, s, ctx_dim)
    return _wrapper_bytes(u, mode, s) + u["layers"] * per_layer


def _working_bytes(u: dict) -> int:
    """The backward's working set of a unit per sample (activation gradients)."""
    if u["kind"] == "attention":
        return BACKWARD_WORKING * u["c"] * u["T"]
    if u["kind"] == "resnet":
        return 4 * (u["cin"] + u["cout"]) * u["T"]
    return 4 * u["c"] * u["T"]


@functools.lru_cache(maxsize=64)
def _units_cached(unet_id: int, unet, side: int):
    return _unet_units(unet, side)


def step_peak(model, settings, resolution: int, batch: int, trained_bytes: int, grad_bytes: int,
              optimizer_temp: int, casts: int) -> dict:
    """The peak moment of a training step: its activations, weight casts, temporaries and gradients, and whether
    it is the optimizer's step (then `optimizer_temp` is held too). Walks the UNet's units backwards: at each, the
    gradients made so far, the activations still kept before it, what the unit itself holds again (recomputed with
    checkpointing) and its backward's working set; the forward's end (gradients freed between steps); the
    optimizer step (every gradient + `optimizer_temp`)."""
    shape = model_shape(model)
    s = settings
    unet = shape.unet
    vae_scale = 2 ** (len(getattr(shape.vae.config, "block_out_channels", (0, 0, 0, 0))) - 1)
    units, top = _units_cached(id(unet), unet, max(1, resolution // vae_scale))
    mode = "lora" if s.use_lora else ("full" if s.train_unet else "frozen")
    ctx_dim = int(unet.config.cross_attention_dim)
    c0 = int(unet.config.block_out_channels[0])
    gc = bool(s.gradient_checkpointing)
    scale = batch * (2 if s.mixed_precision == "no" else 1)
    stem = (6 * c0 + 8) * top * scale
    kept = [_unit_bytes(u, mode, s, ctx_dim, gc) * scale for u in units]
    transient = FORWARD_TRANSIENT * c0 * top * scale
    n_unit = sum(u["params"] for u in units) or 1
    full_grads = mode == "full" and not s.fused_backward
    per_param = grad_bytes / n_unit if full_grads else 0.0
    precision = 2 if s.mixed_precision == "no" else 1
    last = [u for u in units if u["kind"] == "attention"] or units[-1:]
    slices = _slice_working(last[-1], s) * precision      # the last attention's backward, one slice at a time
    moments = []
    if not gc:         # the forward's end: everything kept, no gradient yet, the casts of trained fp32 weights
        moments.append(dict(activations=sum(kept) + stem + transient, weight_casts=casts, temporaries=slices,
                            gradients=0, optimizer_temp=0))
    else:              # the first recomputation: every checkpoint input + the last transformer block again
        again = _layer_bytes(last[-1], mode, s, ctx_dim) if last[-1]["kind"] == "attention" else 0
        moments.append(dict(activations=sum(kept) + stem + (again + FORWARD_TRANSIENT * c0 * top) * scale,
                            weight_casts=0, temporaries=RECOMPUTE_GRAD * c0 * top * scale + slices, gradients=0,
                            optimizer_temp=0))
    if full_grads:     # the backward, unit by unit from the last: gradients grow, activations shrink
        done = 0
        for k in range(len(units) - 1, -1, -1):
            u = units[k]
            done += u["params"]
            again = (_unit_bytes(u, mode, s, ctx_dim, False) - kept[k] / scale) * scale if gc else 0
            moments.append(dict(activations=sum(kept[:k + 1]) + (2 * c0 + 8) * top * scale + max(again, 0),
                                weight_casts=0 if gc else int(casts * (1 - done / n_unit)),
                                temporaries=_working_bytes(u) * scale + _slice_working(u, s) * precision,
                                gradients=int(per_param * done),
                                optimizer_temp=0))
        moments.append(dict(activations=0, weight_casts=0, temporaries=0, gradients=grad_bytes,
                            optimizer_temp=optimizer_temp))
    elif s.fused_backward:      # the step runs inside the backward: its scratch comes on top of the peak
        for m in moments:
            m["optimizer_temp"] = optimizer_temp
    peak = max(moments, key=lambda m: m["activations"] + m["weight_casts"] + m["temporaries"] + m["gradients"]
               + m["optimizer_temp"])
    peak["activations"] = int(peak["activations"])
    return peak


def _slice_working(u: dict, s) -> int:
    """Sliced attention's backward scratch, once per slice (batch-independent: set_attention_slice("auto") takes
    half the heads at a time): the gradients of one slice's self-attention matrix and of its scores, ~4 bytes per
    element at 2 bytes per element (issue 21.3: the SDXL LoRA wizard row's temporaries, 0.33 GiB)."""
    if s.attention != "sliced" or u.get("kind") != "attention":
        return 0
    return SLICE_WORKING * max(1, u["heads"] // 2) * u["T"] * u["T"]


SLICE_WORKING = 4


def optimizer_step_temp(trained: list, settings) -> int:
    """The optimizer step's scratch on the largest tensor (single-tensor AdamW: two fp32 temporaries)."""
    largest = max((_numel(t) for t in trained), default=0)
    if settings.fused_backward:     # each tensor's fp32 update inside the backward (and its stochastic rounding):
        return 20 * largest         # ~5 fp32 copies of the largest (README's accounted wizard rows: 0.4-0.71 GiB)
    return {"AdamW": 8, "Prodigy": 8, "Lion": 4, "SGD": 0}.get(settings.optimizer, 4) * largest


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
    n_trained = sum(_numel(t) for t in trained)
    fb = frozen_bytes_per_param(s)
    frozen_unet = sum(n * (1 if (fp8 and s.frozen_dtype == "fp8") else fb) for n, fp8 in plan.frozen_unet)
    if not s.use_lora and s.train_unet and s.prior_mode == "base_model":
        # the received UNet stays on the accelerator to give the base model's prediction
        frozen_unet += sum(_numel(t) for t in plan.trained_unet) * fb
    te_partly = plan.te_partly_frozen * fb
    weights = n_trained * wbytes + frozen_unet + te_partly
    if s.fused_backward:      # the largest gradient and the one autograd makes next (the accounting sees both)
        gradients = 2 * max((_numel(t) for t in trained), default=0) * wbytes
    else:
        gradients = n_trained * wbytes
    optimizer = sum(optimizer_state_bytes(t, s) for t in trained)
    ema = 0
    if s.use_ema and s.train_unet and not s.ema_on_cpu:
        ema = 4 * sum(_numel(t) for t in plan.trained_unet)
    casts = 2 * n_trained if (s.weights_dtype == "fp32" and s.mixed_precision != "no") else 0
    # the peak moment (issue 21.3): which gradients, activations, casts and temporaries exist at once
    peak = step_peak(model, s, resolution, batch, sum(_numel(t) for t in plan.trained_unet) * wbytes,
                     gradients, optimizer_step_temp(trained, s), casts)
    # the parts are those of the peak moment: the gradients that exist then (all of them when the optimizer step is
    # the peak; few or none early in the backward; with fused_backward the two at once); what the optimizer step
    # holds is details["gradients_held"] (exact). The step's scratch is counted with the temporaries
    gradients_held = gradients
    if not s.fused_backward:
        gradients = peak["gradients"]
    casts = peak["weight_casts"]
    if s.frozen_dtype == "fp8":     # fp8 layers are cast to the compute dtype, and the casts that backward needs are
        # kept: every layer's without checkpointing, the layers outside the checkpointed blocks' with it
        fp8 = sum(n for n, eligible in plan.frozen_unet if eligible)
        if s.gradient_checkpointing:
            units, _ = _units_cached(id(model_shape(model).unet), model_shape(model).unet, 8)
            fp8 = min(fp8, sum(u.get("unckpt", 0) for u in units))
        casts += 2 * fp8
    text_cached = s.data.cache_text_embeds
    te_resident = (not text_cached) or s.prior_mode == "base_model"
    text_encoders = sum(plan.frozen_te) * fb if te_resident else 0
    vae_bytes = {"fp32": 4, "fp16": 2, "bf16": 2}[s.vae_dtype]
    vae = 0 if s.data.cache_latents else plan.vae * vae_bytes
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "ema": ema, "weight_casts": casts,
             "activations": peak["activations"],
             "temporaries": peak["temporaries"] + peak["optimizer_temp"], "text_encoders": text_encoders,
             "vae": vae, "overhead": OVERHEAD_BYTES}
    details = {"trained_params": n_trained, "trained_tensors": len(trained),
               "frozen_unet_params": sum(n for n, _ in plan.frozen_unet),
               "frozen_text_encoder_params": sum(plan.frozen_te), "vae_params": plan.vae,
               "gradients_held": gradients_held, "resolution": resolution, "batch": batch,
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
                 "against an accounting of the real training step (totals within 5% for SD1.5 / SD2 / SDXL, the "
                 "fused low-memory full fine-tune +15%; activations of SDXL with checkpointing up to +24%); "
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
