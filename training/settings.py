"""Training settings: `DreamBoothSettings`, the object on the `DB_CONFIG` socket.

Every field name is a ComfyUI widget name and a key of a run's config.json, so names are a stable contract.
Each field carries its own description, allowed range or choices and (for "auto" fields) the widget value that
means "auto" in its `dataclasses.field` metadata: validation and the node widgets read the same table, so the
two cannot drift apart.

Three fields may be left `None` ("auto") and are filled by `resolved(concepts)` before training:
`learning_rate` (recommended for LoRA / full fine-tune / the optimizer), `steps_per_image` and
`text_encoder_ratio` (the concept types' presets, see `training.data.settings.concept_type_defaults`).
A run stores and hashes the resolved settings.

Step counting follows the A1111 sd_dreambooth_extension: `steps_per_image` is the number of epochs (one epoch
shows every example once), and a "step" is one optimizer step (`batch_size * gradient_accumulation_steps`
examples). `max_train_steps > 0` caps the total; `steps_per_image = 0` leaves `max_train_steps` alone in charge.

This module imports no torch: node modules import it at ComfyUI start-up.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

from . import compat
from .data.settings import DataSettings, concept_type_defaults
from .sampling import MAX_SEED, SCHEDULER_NAMES

LORA_TYPES = ("lora", "dora", "loha", "lokr")
# Names of training.setup.adapters' target presets (duplicated to keep this module light; a test compares).
LORA_UNET_TARGETS = ("attention", "transformer", "transformer+conv")
LORA_TEXT_ENCODER_TARGETS = ("attention", "attention+mlp")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "linear_with_warmup", "cosine",
                 "cosine_with_restarts", "polynomial")
# "constant" and "linear" are the warm-up-free variants; every other schedule starts with lr_warmup_steps.
WARMUP_SCHEDULERS = ("constant_with_warmup", "linear_with_warmup", "cosine", "cosine_with_restarts", "polynomial")
DECAYING_SCHEDULERS = ("linear", "linear_with_warmup", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "Adafactor", "SGD")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
VAE_DTYPES = ("fp32", "fp16", "bf16")
ATTENTIONS = ("sdpa", "xformers", "sliced")
WEIGHTS_DTYPES = ("fp32", "bf16")
FROZEN_DTYPES = ("auto", "bf16", "fp16", "fp8")
MEMORY_ENGINE_FIELDS = ("fused_backward", "weights_dtype", "frozen_dtype")
MASK_FIELDS = ("masked_loss", "unmasked_weight", "normalize_masked_area")
NOISE_SCHEDULERS = ("DDPM",)
PRIOR_MODES = ("class_images", "base_model")
PREVIEW_SCHEDULERS = SCHEDULER_NAMES       # sampling.py's samplers (its module imports no torch either)

CONFIG_SCHEMA = 1
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")

# Recommended learning rates (A1111 extension guide: ~1e-6 full fine-tune, 1e-4 LoRA). Prodigy estimates
# the step size itself and wants lr = 1.0; Lion takes steps of size lr on every weight (sign update), so it needs
# about a third of AdamW's rate (Lion paper: 3-10x smaller). SGD has no per-weight scaling and needs much more.
# Imagic (Kawar et al. 2023) fine-tunes the whole model at 5e-7.
IMAGIC_FULL_UNET_LR = 5e-7
IMAGIC_FIELDS = ("train_imagic_only", "imagic_embed_steps", "imagic_embed_lr", "imagic_unet_steps",
                 "imagic_unet_lr")
_RECOMMENDED_LR = {  # optimizer -> (LoRA, full fine-tune)
    "AdamW": (1e-4, 1e-6), "AdamW8bit": (1e-4, 1e-6), "Adafactor": (1e-4, 1e-6),
    "Lion": (3e-5, 3e-7), "Lion8bit": (3e-5, 3e-7),
    "Prodigy": (1.0, 1.0),
    "SGD": (1e-2, 1e-4),
}


class SettingsError(ValueError):
    """Settings with one or more problems; `problems` lists each as a sentence naming setting, value and fix."""

    def __init__(self, problems: list[str], what: str = "DreamBooth settings"):
        self.problems = list(problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s):\n- " + "\n- ".join(self.problems))


def recommended_learning_rate(use_lora: bool, optimizer: str = "AdamW") -> float:
    """A good starting UNet learning rate for LoRA or full fine-tuning with `optimizer`."""
    lora_lr, full_lr = _RECOMMENDED_LR.get(optimizer, _RECOMMENDED_LR["AdamW"])
    return lora_lr if use_lora else full_lr


def _setting(default: Any, help: str, *, range: tuple | None = None, choices: tuple | None = None,
             kind: type | None = None, auto: Any = None, affects_result: bool = True):
    """A dataclass field plus the facts validation and widgets need.

    kind: the value type (needed when the default is None); auto: the widget value meaning None ("auto");
    affects_result: False for settings that cannot change the trained weights (they stay out of config_hash).
    """
    meta = {"help": help, "range": range, "choices": choices, "kind": kind or type(default),
            "optional": default is None or auto is not None, "auto": auto, "affects_result": affects_result}
    if isinstance(default, (list, dict, DataSettings)):
        return field(default_factory=lambda: dataclasses.replace(default) if dataclasses.is_dataclass(default)
                     else type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DreamBoothSettings:
    """Every training setting. Build with defaults and `replace(...)`, or from JSON with `from_dict`."""

    # --- general: full fine-tune or adapters -------------------------------------------------------------
    use_lora: bool = _setting(True, "Train a LoRA-style adapter (small file, little VRAM) instead of fine-tuning "
                              "all weights (full checkpoint).")
    lora_type: str = _setting("lora", "Adapter kind (peft): lora, dora (weight-decomposed LoRA), loha (Hadamard "
                              "product), lokr (Kronecker product).", choices=LORA_TYPES)
    lora_rank: int = _setting(16, "Adapter rank (dim): capacity and file size. 4-32 for a subject, up to 128 "
                              "for styles.", range=(1, 1024))
    lora_alpha: float = _setting(16.0, "Adapter alpha: the update is scaled by alpha / rank. Stored in the saved "
                                 "LoRA exactly as trained.", range=(0.0001, 4096.0))
    lora_dropout: float = _setting(0.0, "Dropout on the adapter input during training (0 = off).",
                                   range=(0.0, 0.9))
    lora_unet_targets: str = _setting("transformer", "UNet layers that get adapters: 'attention' (q/k/v/out of "
                                      "every attention), 'transformer' (also proj_in/proj_out and the "
                                      "feed-forward layers: more capacity) or 'transformer+conv' (also the ResNet "
                                      "and up/down-sampling convolutions, kohya's LoCon: learns a subject's shape "
                                      "and pattern faster, about 2x the file size).", choices=LORA_UNET_TARGETS)
    lora_text_encoder_targets: str = _setting("attention+mlp", "Text encoder layers that get adapters (when it "
                                              "trains): 'attention' (q/k/v/out) or 'attention+mlp' (also fc1/fc2).",
                                              choices=LORA_TEXT_ENCODER_TARGETS)
    # --- intervals ---------------------------------------------------------------------------------------------
    steps_per_image: int | None = _setting(None, "Epochs: how many times every training image is seen "
                                           "(A1111 'Training Steps Per Image'; 100-175 is typical). "
                                           "Auto (-1) = the concept type's preset; 0 = no epoch limit, "
                                           "max_train_steps decides.", range=(0, 100000), kind=int, auto=-1)
    max_train_steps: int = _setting(0, "Cap on the total optimizer steps (0 = no cap).", range=(0, 10_000_000))
    pause_after_epochs: int = _setting(0, "Pause every N epochs to let the GPU cool down (0 = never).",
                                       range=(0, 100000), affects_result=False)
    pause_seconds: float = _setting(0.0, "Length of each pause in seconds.", range=(0.0, 3600.0),
                                    affects_result=False)
    save_every_epochs: int = _setting(25, "Save a resumable checkpoint every N epochs (0 = only at the end and "
                                      "on interrupt).", range=(0, 100000), affects_result=False)
    preview_every_epochs: int = _setting(5, "Generate preview images every N epochs (0 = never).",
                                         range=(0, 100000), affects_result=False)
    # --- batching ------------------------------------------------------------------------------------------------
    batch_size: int = _setting(1, "Images per forward pass. Higher needs more VRAM.", range=(1, 256))
    gradient_accumulation_steps: int = _setting(1, "Forward passes whose gradients add up to one optimizer step "
                                                "(effective batch = batch_size x this).", range=(1, 1024))
    set_grads_to_none: bool = _setting(True, "Free gradients between steps instead of zero-filling them (saves "
                                       "memory, same result).", affects_result=False)
    gradient_checkpointing: bool = _setting(True, "Recompute activations in the backward pass: much less VRAM, "
                                            "about 20% slower, same result.", affects_result=False)
    # --- learning rate -----------------------------------------------------------------------------------------
    learning_rate: float | None = _setting(None, "UNet learning rate. Auto (0) = recommended: 1e-4 LoRA, 1e-6 "
                                           "full fine-tune (AdamW), 1.0 for Prodigy.", range=(1e-10, 10.0),
                                           kind=float, auto=0.0)
    text_encoder_lr: float | None = _setting(None, "Text encoder learning rate. Auto (0) = same as "
                                             "learning_rate.", range=(1e-10, 10.0), kind=float, auto=0.0)
    lr_scheduler: str = _setting("constant_with_warmup", "How the learning rate changes over training. "
                                 "'constant' and 'linear' have no warm-up; the others ramp up over "
                                 "lr_warmup_steps first.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _setting(0, "Optimizer steps during which the learning rate ramps linearly from 0.",
                                    range=(0, 1_000_000))
    lr_power: float = _setting(1.0, "Exponent of the 'polynomial' decay (1 = linear).", range=(0.01, 10.0))
    lr_cycles: int = _setting(1, "Number of cosine cycles (hard restarts) of 'cosine_with_restarts'.",
                              range=(1, 1000))
    lr_min: float = _setting(0.0, "Floor of the decaying schedules: the UNet rate ends here instead of 0 (the "
                             "text encoder's floor keeps the same ratio to its rate).", range=(0.0, 10.0))
    max_grad_norm: float = _setting(1.0, "Clip the gradient norm to this value (0 = no clipping).",
                                    range=(0.0, 1000.0))
    weight_decay: float = _setting(0.01, "Decoupled weight decay (AdamW-style).", range=(0.0, 10.0))
    # --- optimizer ---------------------------------------------------------------------------------------------
    optimizer: str = _setting("AdamW", "AdamW (torch); AdamW8bit / Lion8bit (bitsandbytes, 8-bit state: less "
                              "VRAM); Lion (lion-pytorch); Prodigy (prodigyopt; set learning_rate 1.0); "
                              "Adafactor (transformers); SGD (with momentum).", choices=OPTIMIZERS)
    adam_beta1: float = _setting(0.9, "First-moment decay of AdamW / AdamW8bit / Prodigy.",
                                 range=(0.0, 0.9999))
    adam_beta2: float = _setting(0.999, "Second-moment decay of AdamW / AdamW8bit / Prodigy.",
                                 range=(0.0, 0.99999))
    adam_epsilon: float = _setting(1e-8, "Epsilon of AdamW / AdamW8bit / Prodigy.", range=(1e-12, 1e-2))
    sgd_momentum: float = _setting(0.9, "Momentum of SGD.", range=(0.0, 0.9999))
    use_ema: bool = _setting(False, "Keep an exponential moving average of the trained weights (smoother "
                             "results; costs a copy of the trained weights).")
    ema_decay: float = _setting(0.9999, "EMA decay per optimizer step (ramps up from 0.1 over the first steps).",
                                range=(0.5, 0.999999))
    ema_on_cpu: bool = _setting(False, "Keep the EMA copy in CPU RAM instead of VRAM (slower steps).",
                                affects_result=False)
    # --- precision / speed -----------------------------------------------------------------------------------
    mixed_precision: str = _setting("fp16", "Compute precision: no (fp32), fp16, bf16 (Ampere or newer).",
                                    choices=MIXED_PRECISIONS)
    vae_dtype: str = _setting("fp32", "VAE precision. fp32 is safe; fp16 VAEs can produce NaN / black images.",
                              choices=VAE_DTYPES)
    attention: str = _setting("sdpa", "Attention kernel: sdpa (PyTorch, default), xformers (if installed), "
                              "sliced (slowest; for GPUs without sdpa: in training it keeps each slice's attention matrix "
                              "for the backward, more memory than sdpa).", choices=ATTENTIONS)
    # --- memory engine (training/setup/fused.py, training/setup/precision.py) --------------------------------------
    fused_backward: bool = _setting(False, "Step each weight inside the backward pass and free its gradient at "
                                    "once: no full set of gradients is ever held (saves one copy of the trained "
                                    "weights). Same result as the normal step. Needs max_grad_norm 0, "
                                    "gradient_accumulation_steps 1, mixed_precision bf16 or no, and not Prodigy.")
    weights_dtype: str = _setting("fp32", "Precision the trained weights are stored in. bf16 halves their memory "
                                  "(and the gradients'); every update is computed in fp32 and rounded "
                                  "stochastically, so small steps are not lost. Needs mixed_precision bf16; "
                                  "meant for full fine-tunes (LoRA adapters may use it too).",
                                  choices=WEIGHTS_DTYPES)
    frozen_dtype: str = _setting("auto", "Precision of the frozen (not trained) weights on the GPU. auto = the "
                                 "mixed_precision's half type; bf16 / fp16 force one; fp8 keeps frozen UNet weights "
                                 "in float8 and computes layer by layer in the compute precision (LoRA only; "
                                 "for small cards; slightly lower quality).", choices=FROZEN_DTYPES)
    auto_fit: bool = _setting(False, "On a GPU, a pre-flight step at the largest bucket and batch runs before "
                              "training; when it would run out of memory the run stops at once with the estimate "
                              "and the next saving to try. auto_fit on applies the Performance Wizard's savings "
                              "in order (gradient checkpointing, a smaller optimizer, ...) until it fits, and "
                              "says which.", affects_result=False)
    # --- what trains --------------------------------------------------------------------------------------------
    train_unet: bool = _setting(True, "Train the UNet (or its adapter).")
    text_encoder_ratio: float | None = _setting(None, "Fraction of the steps during which the text encoder(s) "
                                                "train, then they freeze (0 = frozen). Auto (-1) = the concept "
                                                "type's preset (person 0.7, style 0.2).", range=(0.0, 1.0),
                                                kind=float, auto=-1.0)
    freeze_clip_norm: bool = _setting(True, "Keep the text encoder's LayerNorm weights frozen while it trains.")
    clip_skip: int = _setting(0, "Text encoder layer to condition on: 1 = last, 2 = penultimate. 0 = the "
                              "model's own default (SD1: 1, SD2/SDXL: 2).", range=(0, 12))
    # --- noise and loss ---------------------------------------------------------------------------------------
    noise_scheduler: str = _setting("DDPM", "Noise schedule used to noise the training latents.",
                                    choices=NOISE_SCHEDULERS)
    zero_terminal_snr: bool = _setting(False, "Rescale the noise schedule to zero terminal SNR (needs a "
                                       "v-prediction model; lets it learn pure black/white images).")
    offset_noise: float = _setting(0.0, "Offset noise strength: adds a per-channel constant to the noise so the "
                                   "model learns overall brightness (0.05-0.1 typical, 0 = off).",
                                   range=(0.0, 1.0))
    min_snr_gamma: float = _setting(0.0, "Min-SNR loss weighting gamma (5 is typical; 0 = off).",
                                    range=(0.0, 100.0))
    prior_loss_weight: float | None = _setting(None, "Weight of the prior-preservation loss for every concept. "
                                               "Auto (-1) = each concept's own prior_loss_weight.",
                                               range=(0.0, 100.0), kind=float, auto=-1.0)
    prior_mode: str = _setting("class_images", "Prior preservation from class images, or from the frozen base "
                               "model's own prediction for the class prompt on the same noisy latents "
                               "(base_model: no class images needed).", choices=PRIOR_MODES)
    masked_loss: bool = _setting(False, "Train on the subject, not its background: each instance image's loss is "
                                 "weighted by its mask (white = subject, black = background). Masks: "
                                 "'<name>-masklabel.png' beside the image (OneTrainer), a same-name file in the "
                                 "concept's mask_dir (kohya), or the image's alpha channel. Images without a mask "
                                 "train on the whole image; class images are never masked.")
    unmasked_weight: float = _setting(0.1, "With masked_loss: the loss weight of the background (a pixel's weight "
                                      "is max(mask, unmasked_weight), as in OneTrainer). 0 ignores the background, "
                                      "1 is the same as no mask.", range=(0.0, 1.0))
    normalize_masked_area: bool = _setting(True, "With masked_loss: divide each image's loss by its mean weight, "
                                           "so a small subject teaches as much per step as a large one.")
    seed: int = _setting(0, "Seed for noise, timesteps, data order and adapter init.", range=(0, MAX_SEED))
    # --- saving and previews ------------------------------------------------------------------------------------
    keep_last_checkpoints: int = _setting(2, "Resumable checkpoints kept in the run folder (0 = keep all).",
                                          range=(0, 1000), affects_result=False)
    run_name: str = _setting("dreambooth", "Run folder name (a timestamp is appended): letters, digits, "
                             "'.', '_', '-', space.", affects_result=False)
    preview_scheduler: str = _setting("ddim", "Sampler for preview images.", choices=PREVIEW_SCHEDULERS,
                                      affects_result=False)
    preview_steps: int = _setting(20, "Sampler steps for preview images.", range=(1, 500), affects_result=False)
    preview_cfg: float = _setting(7.0, "CFG scale for preview images.", range=(1.0, 30.0), affects_result=False)
    # --- validation: which checkpoint is good (training/validation.py, training/best.py) -------------------------
    validate_every_steps: int = _setting(0, "Validate every N optimizer steps, and at each checkpoint and the end "
                                         "(0 = off): the subject loss at fixed noise and timesteps (per band: low "
                                         "t=150, mid 500, high 850, and averaged), the prior drift against the base "
                                         "model, and at checkpoints a sample grid beside the base model's. Numbers "
                                         "in validation.jsonl, grids in previews/; ~100 is a good start.",
                                         range=(0, 10_000_000), affects_result=False)
    validation_images: str = _setting("", "What the subject loss is measured on. Empty = the training images (a "
                                      "subject with few photos cannot spare one; the loss then shows memorisation); "
                                      "a number N = hold the last N instance images (by file name) of each concept "
                                      "out of training; or a folder of other photos of the subject. With "
                                      "keep_best, a held-out loss can be lowest before the subject is learnt well "
                                      "(in the toy world it chose steps 51-204 of 800): check the validation grid.",
                                      affects_result=False)
    validation_prompt: str = _setting("", "Recontextualised prompt of the validation grid (empty = the instance "
                                      "prompt + ', on the beach').", affects_result=False)
    validation_samples: int = _setting(1, "Seeds per prompt in the validation grid (0 = no grid).", range=(0, 16),
                                       affects_result=False)
    keep_best: bool = _setting(False, "Keep the best checkpoint beside keep_last_checkpoints' ones and name it in "
                               "the summary. Rule: among the saved checkpoints the lowest subject loss at the low and middle "
                               "timestep bands wins (the high band's larger errors do not follow what the model draws; "
                               "losses within 5 % of it at 5 validation images, 5 % x sqrt(5 / n) at n, are a tie: the latest of them wins); with best_drift_ceiling > 0 only those whose prior drift is at most that x "
                               "the base model's own subject loss (validated at step 0) qualify, and when none "
                               "does, the lowest drift wins. Needs validate_every_steps.", affects_result=False)
    best_drift_ceiling: float = _setting(0.0, "keep_best's ceiling on prior drift, as a fraction of the base "
                                         "model's subject loss at step 0 (0 = no ceiling; lower = stricter about "
                                         "forgetting the class). Off by default: in the toy world a ceiling of "
                                         "0.25 chose nearly untrained checkpoints (README: Toy world).",
                                         range=(0.0, 100.0), affects_result=False)
    early_stop: int = _setting(0, "Stop the run when the subject loss (low and middle bands, as keep_best) has "
                               "not improved for N validations in a row "
                               "(0 = off); the log says why it stopped. Meaningful with held-out "
                               "validation_images. Needs validate_every_steps.", range=(0, 100000),
                               affects_result=False)
    tensorboard: bool = _setting(False, "Also write TensorBoard event files into the run folder (loss, learning "
                                 "rates, it/s, validation numbers and grids). Needs the tensorboard package "
                                 "(pip install tensorboard); open with tensorboard --logdir <output>/dreambooth.",
                                 affects_result=False)
    # --- Imagic (edit one real image by a text) -------------------------------------------------------------------
    train_imagic_only: bool = _setting(False, "Imagic (Kawar et al. 2023; the A1111 extension's 'Train Imagic "
                                       "Only'): edit one real photo by a text. The concept holds exactly one "
                                       "instance image and its instance_prompt is the target text ('a photo of a "
                                       "sitting dog'). Stage 1 optimises that text's embedding towards the photo "
                                       "(model frozen), stage 2 fine-tunes the UNet (a LoRA with use_lora) on it; "
                                       "then sample with SampleTrained's imagic_alpha (0 = the photo, 1 = the edit). "
                                       "Epochs, text encoder, prior preservation, flips and EMA do not apply.")
    imagic_embed_steps: int = _setting(1000, "Imagic stage 1: optimisation steps of the text embedding (Adam). "
                                       "1000 as in the Imagic paper (Kawar et al. 2023, Stable Diffusion setup); "
                                       "diffusers' community imagic_stable_diffusion.py uses 500.",
                                       range=(1, 100000))
    imagic_embed_lr: float = _setting(1e-3, "Imagic stage 1: learning rate of the embedding optimisation (Adam). "
                                      "1e-3 as in the Imagic paper and diffusers' community "
                                      "imagic_stable_diffusion.py.", range=(1e-10, 10.0))
    imagic_unet_steps: int = _setting(1500, "Imagic stage 2: UNet fine-tuning steps on the optimised embedding. "
                                      "1500 as in the Imagic paper (Kawar et al. 2023); diffusers' community "
                                      "imagic_stable_diffusion.py uses 1000.", range=(1, 1_000_000))
    imagic_unet_lr: float | None = _setting(None, "Imagic stage 2: UNet learning rate (optimizer and lr_scheduler "
                                            "as set). Auto (0) = 5e-7 for a full fine-tune (the Imagic paper; "
                                            "diffusers' community pipeline uses 2e-6), 1e-4 with use_lora.",
                                            range=(1e-10, 10.0), kind=float, auto=0.0)
    # --- data ------------------------------------------------------------------------------------------------------
    data: DataSettings = _setting(DataSettings(), "Dataset-wide image, caption and cache settings.",
                                  kind=DataSettings)

    # ------------------------------------------------------------------------------------------------------------
    def __post_init__(self):
        # Widgets and JSON may give 5 for a float setting; store 5.0 so to_dict and config_hash do not depend on it.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["kind"] is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))

    def replace(self, **changes) -> "DreamBoothSettings":
        return dataclasses.replace(self, **changes)

    # ---- auto values ------------------------------------------------------------------------------------
    def resolved(self, concepts: Iterable = ()) -> "DreamBoothSettings":
        """A copy with every auto (None) field filled in.

        `concepts`: ConceptSettings (anything with `concept_type`). Several concepts: the largest preset wins
        (a face trained beside a style still needs the face's text-encoder share and epochs). No concepts:
        the "person" preset, as ConceptSettings defaults to it.
        """
        types = [getattr(c, "concept_type", "person") for c in concepts] or ["person"]
        presets = [concept_type_defaults(t) for t in types]
        changes = {}
        if self.learning_rate is None:
            changes["learning_rate"] = recommended_learning_rate(self.use_lora, self.optimizer)
        if self.steps_per_image is None:
            changes["steps_per_image"] = max(p["steps_per_image"] for p in presets)
        if self.text_encoder_ratio is None:
            changes["text_encoder_ratio"] = max(p["text_encoder_ratio"] for p in presets)
        if self.train_imagic_only and self.imagic_unet_lr is None:
            changes["imagic_unet_lr"] = IMAGIC_FULL_UNET_LR if not self.use_lora else recommended_learning_rate(
                True, self.optimizer)
        return self.replace(**changes)

    @property
    def is_resolved(self) -> bool:
        return None not in (self.learning_rate, self.steps_per_image, self.text_encoder_ratio)

    def _need(self, name: str):
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{name} is auto (None); call settings.resolved(concepts) first")
        return value

    @property
    def unet_lr(self) -> float:
        return self._need("learning_rate")

    @property
    def text_encoder_learning_rate(self) -> float:
        """The text encoder's rate: text_encoder_lr, or the UNet's when that is auto."""
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.unet_lr

    @property
    def trains_text_encoder(self) -> bool:
        return self._need("text_encoder_ratio") > 0

    @property
    def clip_skip_or_none(self) -> int | None:
        """For encode_prompts(clip_skip=...): None means the model's default."""
        return self.clip_skip or None

    # ---- step arithmetic --------------------------------------------------------------------------------
    def steps_per_epoch(self, num_examples: int, *, batches_per_epoch: int | None = None) -> int:
        """Optimizer steps per epoch: ceil(examples / (batch * accumulation)).

        Pass `batches_per_epoch` when batches cannot mix aspect buckets (then an epoch has more, smaller
        batches than examples / batch_size); the count is ceil(batches / accumulation) in that case.
        """
        if batches_per_epoch is None:
            batches_per_epoch = math.ceil(num_examples / self.batch_size)
        return max(1, math.ceil(batches_per_epoch / self.gradient_accumulation_steps))

    def total_steps(self, num_examples: int, *, batches_per_epoch: int | None = None) -> int:
        """Total optimizer steps: steps_per_image epochs, capped by max_train_steps when that is > 0.

        With steps_per_image = 0 the run is max_train_steps long.
        """
        epochs = self._need("steps_per_image")
        if epochs == 0:
            if self.max_train_steps <= 0:
                raise ValueError("steps_per_image = 0 and max_train_steps = 0: the run has no length")
            return self.max_train_steps
        total = epochs * self.steps_per_epoch(num_examples, batches_per_epoch=batches_per_epoch)
        return min(total, self.max_train_steps) if self.max_train_steps > 0 else total

    def num_epochs(self, num_examples: int, *, batches_per_epoch: int | None = None) -> int:
        """Epochs the run starts (the last one may end early when max_train_steps caps it)."""
        per_epoch = self.steps_per_epoch(num_examples, batches_per_epoch=batches_per_epoch)
        return math.ceil(self.total_steps(num_examples, batches_per_epoch=batches_per_epoch) / per_epoch)

    def text_encoder_train_steps(self, total_steps: int) -> int:
        """Optimizer steps during which the text encoder trains (the first ones); it is frozen after."""
        return int(math.floor(self._need("text_encoder_ratio") * total_steps + 1e-9))

    # ---- validation -------------------------------------------------------------------------------------
    def validate(self, *, num_examples: int | None = None, check_environment: bool = True) -> list[str]:
        """Every problem at once, each naming the setting, the value and the allowed range or fix.

        num_examples: also check what depends on the run length (warm-up shorter than the run).
        check_environment: also check that optional packages the settings need are installed.
        """
        problems: list[str] = []
        for f in fields(self):
            if f.name != "data":
                problems += _field_problems(f, getattr(self, f.name))
        if not isinstance(self.data, DataSettings):
            problems.append(f"data = {self.data!r} is not a DataSettings; build it with DataSettings(...)")
        else:
            problems += [f"data.{p}" for p in self.data.validate()]
        if problems:  # cross-field checks below assume well-typed values
            return problems
        problems += self._cross_field_problems()
        if num_examples is not None and self.steps_per_image is not None and not problems:
            problems += self._length_problems(num_examples)
        if check_environment:
            problems += self._environment_problems()
        return problems

    def check(self, **kwargs) -> "DreamBoothSettings":
        """Raise SettingsError listing every problem; return self when there are none."""
        problems = self.validate(**kwargs)
        if problems:
            raise SettingsError(problems)
        return self

    def _cross_field_problems(self) -> list[str]:
        p: list[str] = []
        if not self.train_unet and self.text_encoder_ratio == 0:
            p.append("train_unet = False and text_encoder_ratio = 0: nothing would train; enable train_unet or "
                     "set text_encoder_ratio above 0")
        if self.steps_per_image == 0 and self.max_train_steps == 0:
            p.append("steps_per_image = 0 and max_train_steps = 0: the run has no length; set steps_per_image "
                     "(epochs, e.g. 100) or max_train_steps")
        if self.lr_warmup_steps > 0 and self.lr_scheduler not in WARMUP_SCHEDULERS:
            p.append(f"lr_warmup_steps = {self.lr_warmup_steps} has no effect with lr_scheduler = "
                     f"{self.lr_scheduler!r}; use {self.lr_scheduler}_with_warmup or set lr_warmup_steps = 0")
        if self.lr_power != 1.0 and self.lr_scheduler != "polynomial":
            p.append(f"lr_power = {self.lr_power} only affects lr_scheduler 'polynomial' (now "
                     f"{self.lr_scheduler!r}); set lr_power = 1 or choose 'polynomial'")
        if self.lr_cycles != 1 and self.lr_scheduler != "cosine_with_restarts":
            p.append(f"lr_cycles = {self.lr_cycles} only affects lr_scheduler 'cosine_with_restarts' (now "
                     f"{self.lr_scheduler!r}); set lr_cycles = 1 or choose 'cosine_with_restarts'")
        if self.lr_min > 0:
            if self.lr_scheduler not in DECAYING_SCHEDULERS:
                p.append(f"lr_min = {self.lr_min} only affects decaying schedules ({', '.join(DECAYING_SCHEDULERS)}),"
                         f" not {self.lr_scheduler!r}; set lr_min = 0 or choose one of them")
            elif self.learning_rate is not None and self.lr_min >= self.learning_rate:
                p.append(f"lr_min = {self.lr_min} is not below learning_rate = {self.learning_rate}; the floor must "
                         "be lower than the starting rate")
        if self.optimizer == "Prodigy":
            if self.learning_rate is not None and not (0.1 <= self.learning_rate <= 10.0):
                p.append(f"learning_rate = {self.learning_rate} with optimizer Prodigy: Prodigy estimates the step "
                         "size itself and learning_rate multiplies it; use 0.1 to 10 (1.0 is standard), or auto")
            if self.text_encoder_lr is not None and self.text_encoder_lr != self.learning_rate:
                p.append(f"text_encoder_lr = {self.text_encoder_lr} with optimizer Prodigy: Prodigy shares one step "
                         "size across all weights and refuses a different text encoder rate; set text_encoder_lr "
                         "to auto (0)")
        p += self._memory_engine_problems()
        if self.pause_after_epochs > 0 and self.pause_seconds == 0:
            p.append(f"pause_after_epochs = {self.pause_after_epochs} with pause_seconds = 0 pauses for nothing; "
                     "set pause_seconds (e.g. 60) or pause_after_epochs = 0")
        if self.pause_seconds > 0 and self.pause_after_epochs == 0:
            p.append(f"pause_seconds = {self.pause_seconds} has no effect with pause_after_epochs = 0; set "
                     "pause_after_epochs (e.g. 10) or pause_seconds = 0")
        p += self._validation_problems()
        if self.train_imagic_only:
            changed = [f"{n} = {getattr(self, n)!r}" for n, default in (("fused_backward", False),
                       ("weights_dtype", "fp32"), ("frozen_dtype", "auto")) if getattr(self, n) != default]
            if changed:
                p.append(f"train_imagic_only = True with {', '.join(changed)}: Imagic's two stages use the plain "
                         "optimizer step in fp32 (a bf16 weight would not move at its 5e-7 learning rate); reset "
                         "them to fused_backward False / weights_dtype fp32 / frozen_dtype auto")
        if self.train_imagic_only and not self.train_unet:
            p.append("train_imagic_only = True with train_unet = False: Imagic's second stage fine-tunes the UNet; "
                     "enable train_unet")
        p += self._mask_problems()
        if not _RUN_NAME_RE.match(self.run_name) or self.run_name.strip() != self.run_name:
            p.append(f"run_name = {self.run_name!r} is not a plain folder name; use 1-100 letters, digits, '.', "
                     "'_', '-' or spaces, starting with a letter or digit, e.g. 'my_dog'")
        return p

    def _mask_problems(self) -> list[str]:
        """unmasked_weight / normalize_masked_area without masked_loss, and masked_loss where it cannot apply."""
        p: list[str] = []
        if not self.masked_loss:
            if self.unmasked_weight != 0.1:
                p.append(f"unmasked_weight = {self.unmasked_weight:g} has no effect with masked_loss = False; turn "
                         "masked_loss on or reset unmasked_weight to 0.1")
            if not self.normalize_masked_area:
                p.append("normalize_masked_area = False has no effect with masked_loss = False; turn masked_loss on "
                         "or reset normalize_masked_area to True")
        elif self.train_imagic_only:
            p.append("masked_loss = True with train_imagic_only = True: Imagic trains on its one whole photo; turn "
                     "masked_loss off")
        return p

    def _validation_problems(self) -> list[str]:
        """keep_best / early_stop / validation_images against validate_every_steps and Imagic."""
        p: list[str] = []
        needs = [n for n in ("keep_best", "early_stop") if getattr(self, n)]
        if needs and not self.validate_every_steps:
            p.append(f"{' and '.join(needs)} need validation numbers but validate_every_steps = 0; set "
                     "validate_every_steps (e.g. 100) or turn them off")
        value = self.validation_images.strip()
        if value.lstrip("-").isdigit() and int(value) < 1:
            p.append(f"validation_images = {value!r}: hold out at least 1 image, or leave it empty to validate on "
                     "the training images")
        if value and not self.validate_every_steps:
            p.append(f"validation_images = {value!r} has no effect with validate_every_steps = 0 (nothing is held out "
                     "or measured); set validate_every_steps (e.g. 100) or leave validation_images empty")
        if self.keep_best and self.save_every_epochs == 0:
            p.append("keep_best = True with save_every_epochs = 0: there are no checkpoints to choose from, only the "
                     "final state; set save_every_epochs (e.g. 5) or turn keep_best off")
        if self.validate_every_steps and self.train_imagic_only:
            p.append("validate_every_steps with train_imagic_only = True: Imagic trains on one photo and has no "
                     "validation; set validate_every_steps = 0")
        return p

    def _memory_engine_problems(self) -> list[str]:
        """fused_backward / weights_dtype / frozen_dtype against the settings they cannot work with."""
        p: list[str] = []
        if self.fused_backward:
            if self.gradient_accumulation_steps > 1:
                p.append(f"fused_backward = True with gradient_accumulation_steps = "
                         f"{self.gradient_accumulation_steps}: fused_backward steps each weight as soon as its "
                         "gradient exists, so gradients cannot add up over several passes; set "
                         "gradient_accumulation_steps = 1 (raise batch_size instead) or turn fused_backward off")
            if self.max_grad_norm > 0:
                p.append(f"fused_backward = True with max_grad_norm = {self.max_grad_norm:g}: clipping to a global "
                         "norm needs every gradient before any step, which fused_backward never holds; set "
                         "max_grad_norm = 0 or turn fused_backward off")
            if self.mixed_precision == "fp16":
                p.append("fused_backward = True with mixed_precision = 'fp16': fp16 loss scaling must see every "
                         "gradient before any step (to skip steps that overflow); use mixed_precision 'bf16' "
                         "(or 'no'), or turn fused_backward off")
        if self.optimizer == "Prodigy" and (self.fused_backward or self.weights_dtype == "bf16"):
            what = "fused_backward = True" if self.fused_backward else "weights_dtype = 'bf16'"
            p.append(f"{what} with optimizer = 'Prodigy': these step each weight with its own optimizer, and "
                     "Prodigy estimates one step size from all weights together; choose AdamW, AdamW8bit, "
                     "Adafactor, Lion or SGD, or turn it off")
        if self.weights_dtype == "bf16" and self.mixed_precision != "bf16":
            p.append(f"weights_dtype = 'bf16' with mixed_precision = {self.mixed_precision!r}: bf16 weights need "
                     "bf16 compute; set mixed_precision = 'bf16' or weights_dtype = 'fp32'")
        if self.frozen_dtype == "fp8" and not self.use_lora:
            p.append("frozen_dtype = 'fp8' with use_lora = False: fp8 stores the frozen base weights under a LoRA, "
                     "and a full fine-tune trains them; use_lora = True, or frozen_dtype 'auto' (or weights_dtype "
                     "'bf16' to save memory in a full fine-tune)")
        if self.frozen_dtype in ("bf16", "fp16") and self.mixed_precision == "no":
            p.append(f"frozen_dtype = {self.frozen_dtype!r} with mixed_precision = 'no': half-precision frozen "
                     "weights would meet fp32 compute; set mixed_precision to "
                     f"{self.frozen_dtype!r} or frozen_dtype 'auto'")
        if self.frozen_dtype == "fp16" and self.mixed_precision == "bf16":
            p.append("frozen_dtype = 'fp16' with mixed_precision = 'bf16': the frozen weights would meet bf16 "
                     "compute; use frozen_dtype 'auto' or 'bf16', or mixed_precision 'fp16'")
        return p

    def _length_problems(self, num_examples: int) -> list[str]:
        if num_examples <= 0:
            return [f"the dataset has {num_examples} examples; add images to the concept folders"]
        return self.run_length_problems(self.total_steps(num_examples), f" for {num_examples} examples")

    def run_length_problems(self, total: int, what: str = "") -> list[str]:
        """What the run's length (optimizer steps, known once the data is prepared) makes impossible."""
        p = []
        if self.lr_scheduler in WARMUP_SCHEDULERS and self.lr_warmup_steps >= total:
            p.append(f"lr_warmup_steps = {self.lr_warmup_steps} is not shorter than the run ({total} steps{what}): "
                     f"the learning rate would never reach learning_rate; lower it, e.g. to {max(0, total // 10)}")
        if not self.train_unet and self.text_encoder_ratio is not None and self.text_encoder_train_steps(total) == 0:
            need = min(1.0, math.ceil(1000 / total) / 1000)      # floor(need * total) >= 1
            p.append(f"train_unet = False and text_encoder_ratio = {self.text_encoder_ratio:g} give the text encoder "
                     f"0 of the run's {total} steps{what}: nothing would train; raise text_encoder_ratio to at "
                     f"least {need:.3g} or enable train_unet")
        return p

    def check_run_length(self, total: int) -> "DreamBoothSettings":
        """Raise SettingsError when the run's length makes a setting impossible (see run_length_problems)."""
        problems = self.run_length_problems(total)
        if problems:
            raise SettingsError(problems)
        return self

    def _environment_problems(self) -> list[str]:
        p: list[str] = []
        missing = compat.missing_optimizer_package(self.optimizer)
        if missing:
            p.append(f"optimizer = {self.optimizer!r}: {missing}")
        if self.tensorboard and not compat.installed("tensorboard"):
            p.append("tensorboard = True but the tensorboard package is not installed; `pip install tensorboard` "
                     "(or comfyui-dreambooth[tensorboard]) or set tensorboard = False")
        if self.attention == "xformers" and not compat.installed("xformers"):
            p.append("attention = 'xformers' but xformers is not installed; `pip install xformers` (matching your "
                     "torch build) or use attention 'sdpa'")
        return p

    # ---- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-safe dict of every setting (data nested under "data")."""
        return dataclasses.asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), sort_keys=True, **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> "DreamBoothSettings":
        """Build from a dict such as a run's config.json. Missing keys take their defaults (older configs load);
        unknown keys and values of the wrong type raise SettingsError naming every one of them."""
        if not isinstance(data, dict):
            raise SettingsError([f"expected a JSON object of settings, got {type(data).__name__}"])
        known = {f.name: f for f in fields(cls)}
        problems: list[str] = []
        unknown = sorted(set(data) - set(known))
        if unknown:
            problems.append(f"unknown setting(s) {', '.join(unknown)}; known settings are "
                            f"{', '.join(sorted(known))}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name not in known:
                continue
            if name == "data":
                data_problems, data_value = _data_from_dict(value)
                problems += data_problems
                if data_value is not None:
                    kwargs["data"] = data_value
                continue
            ok, converted = _convert(known[name], value)
            if ok:
                kwargs[name] = converted
            else:
                problems.append(converted)
        if problems:
            raise SettingsError(problems, "DreamBooth settings from dict")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "DreamBoothSettings":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SettingsError([f"not valid JSON: {e}"]) from None
        return cls.from_dict(data)

    # ---- identity ---------------------------------------------------------------------------------------
    def result_dict(self) -> dict:
        """The settings that can change the trained weights (what config_hash covers). Auto data values are
        given as what they resolve to, so auto and its explicit value name the same run."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name != "data" and f.metadata["affects_result"]}
        # Imagic settings name a run only when they can matter (Imagic on, or changed): the hashes of the runs
        # made before they existed stay the same
        for name in IMAGIC_FIELDS:
            if not self.train_imagic_only and out[name] == settings_fields()[name].default:
                del out[name]
        # the memory engine's and masked loss's settings likewise, at their defaults (runs made before they existed
        # keep their hash)
        for name in MEMORY_ENGINE_FIELDS + MASK_FIELDS:
            if out[name] == settings_fields()[name].default:
                del out[name]
        data_defaults = DataSettings()
        out["data"] = {k: (float(v) if isinstance(getattr(data_defaults, k), float) and isinstance(v, int)
                           and not isinstance(v, bool) else v)
                       for k, v in dataclasses.asdict(self.data.resolved()).items() if k not in _DATA_COSMETIC}
        return out

    def config_hash(self) -> str:
        """Stable 16-hex-digit hash of the result-relevant settings.

        Left out (they cannot change the weights): run_name, save/preview/pause cadence and preview sampler,
        keep_last_checkpoints, ema_on_cpu, gradient_checkpointing, set_grads_to_none, auto_fit (the settings it
        changes are hashed as changed), data.cache_mode, the validation settings (validate_every_steps ...
        tensorboard: held-out validation_images leave the training data, which the run id covers).
        Hash resolved settings (`resolved(concepts)`), so that auto and its explicit value name the same run.
        The run identity also needs the data hash and the base model hash (the trainer combines them).
        """
        payload = json.dumps({"schema": CONFIG_SCHEMA, "settings": self.result_dict()}, sort_keys=True,
                             separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def summary(self) -> str:
        """One short human-readable paragraph (shown on nodes and in logs)."""
        mode = (f"{self.lora_type} rank {self.lora_rank} alpha {self.lora_alpha:g}" if self.use_lora
                else "full fine-tune")
        lr = "auto" if self.learning_rate is None else f"{self.learning_rate:g}"
        epochs = "auto" if self.steps_per_image is None else str(self.steps_per_image)
        ratio = "auto" if self.text_encoder_ratio is None else f"{self.text_encoder_ratio:g}"
        return (f"{mode}; {epochs} steps/image, max {self.max_train_steps or 'no cap'}; batch {self.batch_size} x "
                f"{self.gradient_accumulation_steps}; {self.optimizer} lr {lr} ({self.lr_scheduler}); "
                f"{self.mixed_precision}; unet {'on' if self.train_unet else 'off'}, text encoder ratio {ratio}; "
                f"seed {self.seed}")


_DATA_COSMETIC = frozenset({"cache_mode"})


def settings_fields() -> dict[str, dataclasses.Field]:
    """name -> dataclass field (with metadata: help, range, choices, kind, optional, auto, affects_result)."""
    return {f.name: f for f in fields(DreamBoothSettings)}


def _field_problems(f: dataclasses.Field, value: Any) -> list[str]:
    meta = f.metadata
    if value is None:
        return [] if meta["optional"] else [f"{f.name} is None; set a value"]
    kind = meta["kind"]
    if kind is bool and not isinstance(value, bool):
        return [f"{f.name} = {value!r} is not true/false"]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        return [f"{f.name} = {value!r} is not a whole number"]
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return [f"{f.name} = {value!r} is not a number"]
    if kind is float and not math.isfinite(value):
        return [f"{f.name} = {value!r} is not a finite number"]
    if kind is str and not isinstance(value, str):
        return [f"{f.name} = {value!r} is not text"]
    if meta["choices"] is not None and value not in meta["choices"]:
        return [f"{f.name} = {value!r} is not allowed; use one of: {', '.join(meta['choices'])}"]
    if meta["range"] is not None:
        lo, hi = meta["range"]
        if not (lo <= value <= hi):
            auto = (f", or {meta['auto']} for auto" if meta["auto"] is not None else "")
            return [f"{f.name} = {value!r} is out of range; use {lo:g} to {hi:g}{auto}"]
    return []


def _convert(f: dataclasses.Field, value: Any) -> tuple[bool, Any]:
    """JSON value -> field value. (True, value) or (False, problem sentence)."""
    kind, optional = f.metadata["kind"], f.metadata["optional"]
    if value is None:
        return (True, None) if optional else (False, f"{f.name} = null is not allowed; give a value")
    if kind is bool:
        return (True, value) if isinstance(value, bool) else (False, f"{f.name} = {value!r} is not true/false")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        return False, f"{f.name} = {value!r} is not a whole number"
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, f"{f.name} = {value!r} is not a number"
    if kind is str:
        return (True, value) if isinstance(value, str) else (False, f"{f.name} = {value!r} is not text")
    return True, value


def _data_from_dict(value: Any) -> tuple[list[str], DataSettings | None]:
    if isinstance(value, DataSettings):
        return [], value
    if not isinstance(value, dict):
        return [f"data = {value!r} is not an object of data settings"], None
    try:
        return [], DataSettings.from_dict(value, strict=True)
    except ValueError as e:
        return [f"data: {e}"], None


__all__ = ["DreamBoothSettings", "SettingsError", "IMAGIC_FIELDS", "IMAGIC_FULL_UNET_LR", "recommended_learning_rate", "settings_fields",
           "LORA_TYPES", "LORA_UNET_TARGETS", "LORA_TEXT_ENCODER_TARGETS", "LR_SCHEDULERS", "WARMUP_SCHEDULERS", "DECAYING_SCHEDULERS", "OPTIMIZERS",
           "MIXED_PRECISIONS", "VAE_DTYPES", "ATTENTIONS", "WEIGHTS_DTYPES", "FROZEN_DTYPES", "NOISE_SCHEDULERS", "PRIOR_MODES",
           "PREVIEW_SCHEDULERS", "MASK_FIELDS"]
