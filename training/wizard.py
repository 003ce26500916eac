"""The performance wizard: settings that fit a card's memory (`choose_settings`), by applying the memory savings
(`savings`) in order to a fast start until memory.estimate() fits. The pre-flight step's auto_fit walks the same
savings (preflight.next_saving).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .compat import missing_optimizer_package
from .memory import FAMILY_NAMES, GB, TIGHT_FRACTION, Estimate, estimate, model_shape


MAX_WIZARD_BATCH = 4        # the wizard's largest batch (A1111's wizard likewise starts small)
MAX_VRAM_GB = 16384         # a card's memory in GB; more is a typo (1e308 overflowed the byte count)


MODES = ("auto", "lora", "full")


@dataclass
class WizardResult:
    settings: object             # DreamBoothSettings
    estimate: Estimate
    explanation: str
    fits: bool
    vram_bytes: int

    def to_json_dict(self) -> dict:
        """{"settings": {name: value}, "estimate_gb": {part: GB, ..., "total": GB}, "explanation": str}; settings
        named as on the settings nodes (only those the wizard sets)."""
        return {"settings": {k: getattr(self.settings, k) for k in WIZARD_SETTINGS} | {
                    "resolution": self.settings.data.resolution},
                "estimate_gb": self.estimate.gb(), "explanation": self.explanation}


WIZARD_SETTINGS = ("use_lora", "lora_rank", "batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
                   "optimizer", "mixed_precision", "fused_backward", "max_grad_norm", "weights_dtype",
                   "frozen_dtype", "use_ema", "ema_on_cpu", "text_encoder_ratio", "attention")


def _divisors_down(n: int, start: int) -> list[int]:
    return [b for b in range(min(start, max(n, 1)), 0, -1) if n % b == 0]


def _eight_bit_available() -> bool:
    return missing_optimizer_package("AdamW8bit") is None


def savings(mode_lora: bool, images: int, imagic: bool = False) -> list:
    """The savings in the order the wizard applies them: each (description with its speed / quality cost,
    change(settings) -> settings or None when it does not apply). Order: what costs nothing first, then speed,
    then precision, then capacity (the A1111 guide's 'lower VRAM' list and the memory engine's savings).
    Imagic (`imagic`) runs its stages with the plain step: no fused_backward, bf16 weights or fp8 frozen weights
    (the trainer refuses them), and its text encoder is frozen anyway."""
    small_opt = "AdamW8bit" if _eight_bit_available() else "Adafactor"

    def batch_down(s):
        smaller = [b for b in _divisors_down(images, s.batch_size - 1)]
        return s.replace(batch_size=smaller[0]) if smaller else None

    steps = [
        ("gradient_checkpointing on: recompute activations in the backward pass (about 20% slower, same result)",
         lambda s: None if s.gradient_checkpointing else s.replace(gradient_checkpointing=True)),
        (f"optimizer {small_opt}: {'8-bit moments (no speed cost, tiny precision cost)' if small_opt == 'AdamW8bit' else 'factored second moments (a little slower per step, no first moment)'}",
         lambda s: None if s.optimizer != "AdamW" else s.replace(optimizer=small_opt)),
        ("mixed_precision bf16 + fused_backward (max_grad_norm 0): no full set of gradients (same speed; no "
         "gradient clipping; needs an Ampere or newer GPU)",
         lambda s: None if s.fused_backward else s.replace(mixed_precision="bf16", fused_backward=True,
                                                            max_grad_norm=0.0)),
        ("smaller batch (divides the image count): less memory, fewer images per second",
         batch_down),
        ("weights_dtype bf16: trained weights in bf16 with stochastic rounding (no fp32 master copy; tiny "
         "precision cost)", lambda s: None if s.weights_dtype == "bf16" else s.replace(weights_dtype="bf16",
                                                                                        mixed_precision="bf16")),
    ]
    if mode_lora:
        steps += [
            ("frozen_dtype fp8: frozen UNet weights in float8, cast layer by layer (a little slower, slightly "
             "lower quality)", lambda s: None if s.frozen_dtype == "fp8" else s.replace(frozen_dtype="fp8")),
            ("lower LoRA rank (less capacity)",
             lambda s: s.replace(lora_rank=s.lora_rank // 2) if s.lora_rank > 4 else None),
        ]
    steps += [
        ("text encoder frozen (text_encoder_ratio 0): its embeddings are cached and it leaves the GPU (weaker "
         "likeness for faces)", lambda s: None if s.text_encoder_ratio == 0 else s.replace(text_encoder_ratio=0.0)),
    ]
    if imagic:
        steps = [step for step in steps if not step[0].startswith(IMAGIC_REFUSES)]
    return steps


# the savings Imagic's trainer refuses (training/settings.py: train_imagic_only with any of them), by description
IMAGIC_REFUSES = ("mixed_precision bf16 + fused_backward", "weights_dtype bf16", "frozen_dtype fp8",
                  "text encoder frozen")


def _refused(changed, before) -> bool:
    """A saving whose result the trainer would refuse (when the settings before it were accepted) is skipped."""
    return bool(changed.validate(check_environment=False)) and not before.validate(check_environment=False)


def _plan(model, base, vram: int, images: int, lora: bool, processes: int = 1):
    """Apply savings in order until the estimate fits `vram`. Returns (settings, estimate, applied, fits).
    Several processes: fused_backward (refused there) is skipped."""
    s = base.replace(use_lora=lora, learning_rate=None)     # auto: the recommended rate of mode and optimizer
    if not lora:
        s = s.replace(frozen_dtype="auto")
    applied = []
    est = estimate(model, s)
    for text, change in savings(lora, images, imagic=s.train_imagic_only):
        while est.total > vram:
            changed = change(s)
            if changed is None or _refused(changed, s) or (processes > 1 and changed.fused_backward):
                break
            s = changed
            est = estimate(model, s)
            if not applied or applied[-1] != text:
                applied.append(text)
        if est.total <= vram:
            break
    return s, est, applied, est.total <= vram


def choose_settings(model, vram_gb: float, *, images: int = 10, resolution: int | None = None, mode: str = "auto",
                    concept_type: str = "person", base=None, processes: int = 1) -> WizardResult:
    """The performance wizard: settings for `model` that fit `vram_gb`.

    Start fast (no gradient checkpointing, AdamW, the family's mixed precision fp16, the largest batch up to
    MAX_WIZARD_BATCH that divides `images`, the concept type's text-encoder share), then apply the savings of
    `savings` in order until the estimate fits: gradient checkpointing, an 8-bit (or Adafactor) optimizer,
    bf16 + fused_backward, a smaller batch, bf16 weights, then for LoRA fp8 frozen weights and lower ranks, then
    a frozen text encoder (not sliced attention: in training it keeps every slice's attention matrix for the
    backward, more than sdpa, issue 21.3). mode auto = full fine-tune when it fits with these savings, else
    LoRA. When nothing fits, the most frugal settings are returned with fits = False and the explanation says so.
    `base`: connected settings to start from; its other settings are kept, and so is its choice of LoRA
    (use_lora on) in mode auto: only mode full turns a LoRA config into a full fine-tune. Imagic settings
    (train_imagic_only) get only the savings Imagic trains with; several `processes` never get fused_backward.
    """
    from .data.settings import DataSettings, concept_type_defaults
    from .settings import DreamBoothSettings

    if mode not in MODES:
        raise ValueError(f"mode = {mode!r}: use one of {', '.join(MODES)}")
    if images < 1:
        raise ValueError(f"images = {images}: the wizard needs the number of training images (1 or more)")
    if not (isinstance(vram_gb, (int, float)) and math.isfinite(vram_gb) and 0 < vram_gb <= MAX_VRAM_GB):
        raise ValueError(f"vram_gb = {vram_gb!r}: give the card's memory in GB, more than 0 and at most {MAX_VRAM_GB}")
    shape = model_shape(model)
    if resolution is None:
        resolution = {"sdxl": 1024, "sd2": 768}.get(shape.family, 512)
    problems = DataSettings(resolution=resolution).validate() if isinstance(resolution, int) else ["not a number"]
    if problems:
        raise ValueError("; ".join(problems) if isinstance(resolution, int) else
                         f"resolution = {resolution!r}: give a whole number of pixels, a multiple of 64")
    kept_lora = mode == "auto" and base is not None and base.use_lora
    if kept_lora:
        mode = "lora"
    base = base or DreamBoothSettings()
    imagic = base.train_imagic_only
    preset = concept_type_defaults(concept_type)
    base = base.replace(
        data=base.data.replace(resolution=resolution), gradient_checkpointing=False, optimizer="AdamW",
        batch_size=_divisors_down(images, MAX_WIZARD_BATCH)[0], gradient_accumulation_steps=1,
        steps_per_image=base.steps_per_image if base.steps_per_image is not None else preset["steps_per_image"],
        text_encoder_ratio=0.0 if imagic else preset["text_encoder_ratio"], use_ema=False, fused_backward=False,
        weights_dtype="fp32", frozen_dtype="auto", attention="sdpa", lora_rank=max(base.lora_rank, 16))
    vram = int(vram_gb * GB)
    tried = []
    if mode in ("auto", "full"):
        tried.append(("full fine-tune", *_plan(shape, base, vram, images, lora=False, processes=processes)))
    if mode == "lora" or (mode == "auto" and not tried[-1][4]):
        tried.append(("LoRA", *_plan(shape, base, vram, images, lora=True, processes=processes)))
    what, s, est, applied, fits = tried[-1]
    lines = [f"{what} of an {FAMILY_NAMES.get(shape.family, shape.family)} model at {resolution}px, "
             f"batch {s.batch_size}, on {vram_gb:g} GB: "
             f"estimated {est.total / GB:.2f} GB" + ("" if fits else " - DOES NOT FIT even with every saving; use "
                                                     "a smaller resolution or a larger card")]
    if fits and est.total > TIGHT_FRACTION * vram:
        lines.append(f"tight: {(vram - est.total) / GB:.2f} GB to spare, within {100 - int(TIGHT_FRACTION * 100)}% "
                     f"of the card's memory, and the overhead in the estimate is a guess (not yet measured on a GPU): "
                     f"a lower resolution leaves more room.")
    if kept_lora:
        lines.append("LoRA because the connected settings have use_lora on (kept in mode auto; mode full "
                     "fine-tunes the whole model instead).")
    if imagic:
        lines.append("Imagic: only the savings its two stages train with (no fused_backward, bf16 weights or fp8 "
                     "frozen weights; its text encoder is frozen).")
    if mode == "auto" and len(tried) == 2:
        lines.append(f"full fine-tune would need {tried[0][2].total / GB:.2f} GB even with every saving, so LoRA.")
    if applied:
        lines.append("turned on to fit, in this order:")
        lines += [f"- {t}" for t in applied]
    else:
        lines.append("fits without any memory saving (fastest settings).")
    lines.append("activations are checked against an accounting of the real step (totals within 5%, the fused low-"
                 "memory full fine-tune +15%); overhead (CUDA context, allocator) is a guess; the rest is exact.")
    return WizardResult(s, est, "\n".join(lines), fits, vram)


def images_in(concepts) -> int:
    """Examples per epoch of `concepts` (instance images x repeats, + as many prior examples with prior
    preservation), from a folder scan: what batch_size should divide."""
    from .data.report import scan_report

    return scan_report(list(concepts)).examples_per_epoch


def concept_type_of(concepts) -> str:
    """The concept type whose preset wins (the most text-encoder training: person > object > style)."""
    from .data.settings import concept_type_defaults

    types = [getattr(c, "concept_type", "person") for c in concepts] or ["person"]
    return max(types, key=lambda t: (concept_type_defaults(t)["text_encoder_ratio"],
                                     concept_type_defaults(t)["steps_per_image"]))
