"""The training step's activations, weight casts and temporaries from the UNet's architecture (memory.py's
estimate uses them; issue 21.3). Split from memory.py to keep each file readable; plain arithmetic over a
diffusers UNet's modules, no torch import at module level.
"""
from __future__ import annotations

import functools
import math


def numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def base_layer(module):
    """A peft-wrapped layer's original layer (an SDModel that already carries adapters)."""
    return getattr(module, "base_layer", module)


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
# keeps only its input; the peak is the last transformer block's recomputation (all that it keeps again, with the
# inputs of the units before it: SDXL's top-level ResnetBlock2Ds come after it and are through their backward by
# then), or one of those later ResnetBlock2Ds' backward, or, for a full fine-tune, the end of the backward (every
# gradient made, the first blocks' activations and their backward's working set; norm_out / conv_out's inputs are
# freed by then; a transformer block at a time is recomputed, its backward's peak in the feed-forward's, after
# ff.net.2's input is freed) or, with fused_backward, the step of the largest tensor inside the backward.
# Fitted on the SD1.5 rows of the accounting (bench/memory.py --grid) and checked on the others:
FORWARD_TRANSIENT = 15      # bytes per C x token alive at the forward's end / a recomputation's end (GEGLU)
RECOMPUTE_GRAD = 6          # bytes per C x token: the output gradient while the last block is recomputed
FF_OUT_INPUT = 8            # bytes per C x token: ff.net.2's input (4 x C, bf16), freed early in a block's backward
HEAD_GRAD = 4               # bytes per C0 x token: what the head (norm_out, in fp32 under autocast) hands the
#                             UNet's last unit as its output gradient, held while that unit is recomputed
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

    def largest(m):
        return max((p.numel() for p in m.parameters()), default=0)

    def resnet(r, t):
        return dict(kind="resnet", T=t, cin=base_layer(r.conv1).in_channels, cout=base_layer(r.conv2).out_channels,
                    params=n(r), largest=largest(r))

    def attention(a, t):
        blocks = a.transformer_blocks
        proj = base_layer(a.proj_in)
        c = proj.in_channels if isinstance(proj, nn.Conv2d) else proj.in_features
        return dict(kind="attention", T=t, c=c, layers=len(blocks), heads=blocks[0].attn1.heads,
                    conv=isinstance(proj, nn.Conv2d), params=n(a), largest=largest(a),
                    unckpt=base_layer(a.proj_in).weight.numel() + base_layer(a.proj_out).weight.numel())

    def block(b, t):
        out, atts = [], list(getattr(b, "attentions", None) or [])
        for k, r in enumerate(b.resnets):
            out.append(resnet(r, t))
            if k < len(atts):
                out.append(attention(atts[k], t))
        for sampler, kind in ((getattr(b, "downsamplers", None), "down"), (getattr(b, "upsamplers", None), "up")):
            for d in sampler or []:
                out.append(dict(kind=kind, T=t, c=base_layer(d.conv).in_channels, params=n(d), unckpt=n(d),
                                largest=largest(d)))
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


def _recomputed(u: dict, mode: str, s, ctx_dim: int, kept: float) -> float:
    """What a checkpointed unit holds again, beyond its kept input, while its backward recomputes it: a
    Transformer2DModel one BasicTransformerBlock at a time (each is its own checkpoint: SDXL's ten layers are
    never recomputed at once), a ResnetBlock2D all of it."""
    if u["kind"] == "attention":
        return max(_layer_bytes(u, mode, s, ctx_dim) - 2 * u["c"] * u["T"], 0)
    return max(_unit_bytes(u, mode, s, ctx_dim, False) - kept, 0)


def _level(u: dict) -> int:
    """Channels x tokens per sample at a unit's output (its level of the UNet)."""
    return (u["cout"] if u["kind"] == "resnet" else u["c"]) * u["T"]


def _head_grad(k: int, units: list) -> int:
    """HEAD_GRAD for the UNet's last unit (the head follows it: SD1.5 / SD2's last transformer block), else 0: an
    earlier unit gets its output gradient from the next unit in the compute dtype, which RECOMPUTE_GRAD counts."""
    return HEAD_GRAD if k == len(units) - 1 else 0


def _working_bytes(u: dict) -> int:
    """The backward's working set of a unit per sample (activation gradients)."""
    if u["kind"] == "attention":
        return BACKWARD_WORKING * u["c"] * u["T"]
    if u["kind"] == "resnet":   # at its peak (conv2's backward, the accounting's SDXL top-level moment): the output
        # gradient, its copy through the residual's scale and conv2's input gradient in bf16 + norm2's in fp32,
        # all of the output's size: ~8 bytes per output channel x token (the input's size comes later, freed)
        return 8 * u["cout"] * u["T"]
    return 4 * u["c"] * u["T"]


@functools.lru_cache(maxsize=64)
def units_cached(unet_id: int, unet, side: int):
    return _unet_units(unet, side)


def step_peak(shape, settings, resolution: int, batch: int, trained_bytes: int, grad_bytes: int,
              optimizer_temp: int, casts: int) -> dict:
    """The peak moment of a training step: its activations, weight casts, temporaries and gradients, and whether
    it is the optimizer's step (then `optimizer_temp` is held too). Walks the UNet's units backwards: at each, the
    gradients made so far, the activations still kept before it, what the unit itself holds again (recomputed with
    checkpointing) and its backward's working set; the forward's end (gradients freed between steps); the
    optimizer step (every gradient + `optimizer_temp`). `shape`: memory.model_shape of the model."""
    s = settings
    unet = shape.unet
    vae_scale = 2 ** (len(getattr(shape.vae.config, "block_out_channels", (0, 0, 0, 0))) - 1)
    units, top = units_cached(id(unet), unet, max(1, resolution // vae_scale))
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
    else:              # the last transformer block's recomputation: the checkpoint inputs up to it + that block again
        # + its GEGLU transient and output gradient. Units after it (SDXL's top level has no attention: an
        # upsampler and three ResnetBlock2Ds) and the head (norm_out, conv_out) are through their backward by then:
        # their inputs are freed; the transient and the gradient are the block's own size (its channels x tokens,
        # a level down in SDXL), not the top level's. Each of those later units is a moment of its own (below).
        k_last = max(k for k, u in enumerate(units) if u is last[-1])     # (equal dicts: by identity)
        u = last[-1]
        again = _layer_bytes(u, mode, s, ctx_dim) if u["kind"] == "attention" else 0
        level = _level(u)
        moments.append(dict(activations=sum(kept[:k_last + 1]) + (2 * c0 + 8) * top * scale
                            + (again + (_head_grad(k_last, units) + FORWARD_TRANSIENT) * level) * scale,
                            weight_casts=0, temporaries=RECOMPUTE_GRAD * level * scale + slices, gradients=0,
                            optimizer_temp=0))
        for k in range(k_last + 1, len(units)) if not full_grads else ():
            u = units[k]     # recomputed (a ResnetBlock2D) or not (an upsampler) in its backward; its output
            # gradient is in its working set
            moments.append(dict(
                activations=sum(kept[:k + 1]) + (2 * c0 + 8) * top * scale
                + _recomputed(u, mode, s, ctx_dim, kept[k] / scale) * scale,
                weight_casts=0, temporaries=_working_bytes(u) * scale, gradients=0, optimizer_temp=0))
    fused_full = mode == "full" and s.fused_backward
    wbytes = 2 if s.weights_dtype == "bf16" else 4
    if full_grads or fused_full:    # the backward, unit by unit from the last: activations shrink, and either the
        # gradients grow, or (fused_backward) each tensor is stepped as its gradient is made: then the moment is
        # the step of the unit's largest tensor (its fp32 copy, its gradient in fp32 and the optimizer's scratch:
        # FUSED_STEP_BYTES per element; a bf16 gradient is freed once copied, an fp32 one is the step's own)
        done = 0
        for k in range(len(units) - 1, -1, -1):
            u = units[k]
            done += u["params"]
            # a recomputed transformer block's backward peaks in its feed-forward's, once ff.net.2's backward has
            # freed that layer's input (the GEGLU product, 4 x C per token) and made its gradient (the working
            # set), not at the recomputation's end: the block's saved tensors less that input (the weight
            # gradients the block makes are counted as made: they are few beside the activations)
            held = (_recomputed(u, mode, s, ctx_dim, kept[k] / scale)
                    - (FF_OUT_INPUT * u["c"] * u["T"] if u["kind"] == "attention" and full_grads else 0))
            moments.append(dict(
                activations=sum(kept[:k + 1]) + (2 * c0 + 8) * top * scale + (held * scale if gc else 0),
                weight_casts=0 if gc or fused_full else int(casts * (1 - done / n_unit)),
                temporaries=_working_bytes(u) * scale + _slice_working(u, s) * precision,
                gradients=(u["largest"] * wbytes if wbytes == 4 else 0) if fused_full else int(per_param * done),
                optimizer_temp=FUSED_STEP_BYTES * u["largest"] if fused_full else 0))
        # the optimizer step with every gradient; fused: the tensors outside the units (stem, head, a trained text
        # encoder), stepped last, the largest of all among them
        moments.append(dict(activations=0, weight_casts=0, temporaries=0, gradients=0 if fused_full else grad_bytes,
                            optimizer_temp=optimizer_temp))
    elif s.fused_backward:      # LoRA (small tensors) or a frozen UNet: the step's scratch on top of the peak
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
FUSED_STEP_BYTES = 20       # bytes per element of the tensor fused_backward steps (fp32 copies and scratch)


def optimizer_step_temp(trained: list, settings) -> int:
    """The optimizer step's scratch on the largest tensor (single-tensor AdamW: two fp32 temporaries)."""
    largest = max((numel(t) for t in trained), default=0)
    if settings.fused_backward:     # each tensor's fp32 update inside the backward (and its stochastic rounding):
        return FUSED_STEP_BYTES * largest   # ~5 fp32 copies of the largest (the accounting: 19 for SD1.5's full)
    return {"AdamW": 8, "Prodigy": 8, "Lion": 4, "SGD": 0}.get(settings.optimizer, 4) * largest


__all__ = ["numel", "base_layer", "units_cached", "step_peak", "optimizer_step_temp", "FORWARD_TRANSIENT",
           "RECOMPUTE_GRAD", "BACKWARD_WORKING", "CONTEXT_TOKENS", "SLICE_WORKING", "FUSED_STEP_BYTES"]
