"""Settings nodes: build the `DB_CONFIG` (a `DreamBoothSettings`) in a few chainable nodes.

`DreamBoothSettings` holds what most runs change (mode, length, batch, learning rate and its schedule,
optimizer choice, what trains, precision, saving). `DreamBoothOptimizer`, `DreamBoothAdvanced`,
`DreamBoothData`, `DreamBoothImagic` and `DreamBoothValidation` hold the rest. Each takes an optional `config` and returns a new one with its own widgets
applied (the received config is never modified), so they chain in any order; without `config` a node
starts from the defaults. Settings that depend on each other sit on the same node, so no node rejects a
combination that a later node would fix. Every node validates the whole result and lists every problem.

Widget names are the settings' field names (a stable contract). Widgets, tooltips and ranges come from the
field metadata in training/settings.py; "auto" fields use a sentinel widget value (0 or -1, see tooltips).

Every node also returns `memory_estimate` (its second output, also shown on the node): the accelerator memory
the config it produces needs, per part, for the optionally connected `model` (SD1.5 without one), compared
with the detected device's memory, with a WARNING first line when it does not fit (training/memory.py
settings_estimate_text). Estimating never makes the node fail. `build()` returns the config alone (`(config,)`),
for callers that only want the settings (the CLI, tests).
"""
from __future__ import annotations

import dataclasses

from ..training.data.settings import CACHE_MODES, LONG_CAPTIONS, ON_BAD_IMAGE, DataSettings
from ..training.settings import DreamBoothSettings, SettingsError, settings_fields

CATEGORY = "DreamBooth/settings"
CONFIG_TYPE = "DB_CONFIG"

# Widget step sizes; FLOAT widgets default to 0.01.
_FLOAT_STEPS = {"learning_rate": 1e-7, "text_encoder_lr": 1e-7, "lr_min": 1e-8, "adam_epsilon": 1e-9,
                "ema_decay": 1e-5, "adam_beta1": 1e-3, "adam_beta2": 1e-4, "sgd_momentum": 1e-3,
                "lora_alpha": 0.5, "pause_seconds": 1.0, "preview_cfg": 0.5, "lr_power": 0.1,
                "max_grad_norm": 0.1, "min_snr_gamma": 0.5, "lora_dropout": 0.01, "offset_noise": 0.01,
                 "imagic_embed_lr": 1e-4, "imagic_unet_lr": 1e-8, "unmasked_weight": 0.05,
                 "best_drift_ceiling": 0.01}
# The widget range can differ from the validated range when the auto sentinel lies outside it.
_WIDGET_MAX = {"max_train_steps": 10_000_000, "steps_per_image": 100000}


def _widget(name: str):
    f = settings_fields()[name]
    meta = f.metadata
    default = f.default
    tooltip = meta["help"]
    if default is None:
        default = meta["auto"]
    kind = meta["kind"]
    if meta["choices"] is not None:
        return (list(meta["choices"]), {"default": default, "tooltip": tooltip})
    if kind is bool:
        return ("BOOLEAN", {"default": default, "tooltip": tooltip})
    if kind is str:
        return ("STRING", {"default": default, "multiline": False, "tooltip": tooltip})
    lo, hi = meta["range"]
    if meta["auto"] is not None:
        lo = min(lo, meta["auto"])
    hi = _WIDGET_MAX.get(name, hi)
    if kind is int:
        spec = {"default": default, "min": lo, "max": hi, "step": 1, "tooltip": tooltip}
        if name == "seed":
            # ComfyUI's frontend adds a "randomize after queue" control to any widget named seed: a new seed every
            # queue would defeat run reuse and resume=auto, so the training seed stays fixed
            spec["control_after_generate"] = False
        return ("INT", spec)
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": _FLOAT_STEPS.get(name, 0.01),
                      "round": False, "tooltip": tooltip})


def _from_widget(name: str, value):
    """Widget value -> field value: the auto sentinel becomes None; numbers get the field's type."""
    meta = settings_fields()[name].metadata
    if meta["auto"] is not None and value == meta["auto"]:
        return None
    if meta["kind"] is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


_CONFIG_INPUT = {"config": (CONFIG_TYPE, {"tooltip": "Optional settings to start from (from another DreamBooth "
                                                     "settings node); this node's widgets override its values."}),
                 "model": ("DB_MODEL", {"tooltip": "Optional: the base model you will train, for the memory "
                                                   "estimate only (its own sizes). Without it the estimate is "
                                                   "for SD1.5."})}
# ComfyUI hands these in: the node's id and the queued graph, to tell when this node's config feeds another
# settings node (its estimate is then of the settings so far, which the estimate text says).
_HIDDEN = {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}
CHAIN_NODES = ("DreamBoothSettings", "DreamBoothOptimizer", "DreamBoothAdvanced", "DreamBoothData", "DreamBoothImagic",
               "PerformanceWizard")
_RETURN_TYPES = (CONFIG_TYPE, "STRING")
_RETURN_NAMES = ("config", "memory_estimate")
_OUTPUT_TOOLTIPS = ("DreamBooth training settings; connect to TrainDreamBooth or another settings node.",
                    "The GPU memory these settings need, per part (weights, gradients, optimizer, activations, "
                    "...), for the connected model (SD1.5 without one), compared with the detected GPU; starts "
                    "with WARNING when it does not fit. Also shown on the node.")


def _check(settings: DreamBoothSettings, node: str) -> DreamBoothSettings:
    problems = settings.validate()
    if problems:
        raise SettingsError(problems, f"{node}: invalid settings")
    return settings


def next_settings_node(unique_id, prompt) -> str | None:
    """The settings node of the queued `prompt` that this node's config goes on to ("DreamBoothSettings #7"), or
    None (this node's config is the one that trains, or ComfyUI did not say)."""
    if unique_id is None or not isinstance(prompt, dict):
        return None
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or node.get("class_type") not in CHAIN_NODES:
            continue
        for value in (node.get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) == str(unique_id) and value[1] == 0:
                return f"{node['class_type']} #{node_id}"
    return None


def _with_estimate(settings: DreamBoothSettings, model, unique_id=None, prompt=None) -> dict:
    """The node's return: the config, and the memory estimate as output and as text shown on the node (first
    saying so when a later settings node changes these settings)."""
    from ..training.memory import settings_estimate_text
    from .comfy_compat import comfy_torch_device

    try:
        device = comfy_torch_device()
    except Exception:           # noqa: BLE001 - the estimate then says no device was found
        device = None
    text = settings_estimate_text(model, settings, device)
    later = next_settings_node(unique_id, prompt)
    if later:
        text = (f"(settings so far: {later} changes them after this node; the estimate that applies to training "
                f"is on the last settings node)\n{text}")
    return {"ui": {"text": [text]}, "result": (settings, text)}


def _start(config) -> DreamBoothSettings:
    if config is None:
        return DreamBoothSettings()
    if not isinstance(config, DreamBoothSettings):
        raise TypeError(f"config must be a DB_CONFIG (DreamBoothSettings), got {type(config).__name__}")
    return config


class _FieldsNode:
    """A node whose widgets are DreamBoothSettings fields."""

    FIELDS: tuple = ()
    RETURN_TYPES = _RETURN_TYPES
    RETURN_NAMES = _RETURN_NAMES
    OUTPUT_TOOLTIPS = _OUTPUT_TOOLTIPS
    FUNCTION = "configure"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {name: _widget(name) for name in cls.FIELDS}, "optional": dict(_CONFIG_INPUT),
                "hidden": dict(_HIDDEN)}

    def build(self, config=None, **widgets):
        unknown = sorted(set(widgets) - set(self.FIELDS))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected inputs {unknown}")
        changes = {name: _from_widget(name, value) for name, value in widgets.items()}
        return (_check(_start(config).replace(**changes), type(self).__name__),)

    def configure(self, config=None, model=None, unique_id=None, prompt=None, **widgets):
        (settings,) = self.build(config=config, **widgets)
        return _with_estimate(settings, model, unique_id, prompt)


class DreamBoothSettingsNode(_FieldsNode):
    DESCRIPTION = ("DreamBooth training settings: LoRA or full fine-tune, run length, batch, learning rate and "
                   "schedule, optimizer, what trains, precision, saving. Chain DreamBooth Optimizer / Advanced / "
                   "Data nodes for the rest.")
    FIELDS = ("use_lora", "lora_type", "lora_rank", "lora_alpha", "lora_dropout",
              "steps_per_image", "max_train_steps", "batch_size", "gradient_accumulation_steps",
              "optimizer", "learning_rate", "text_encoder_lr", "lr_scheduler", "lr_warmup_steps", "lr_power",
              "lr_cycles", "lr_min", "train_unet", "text_encoder_ratio", "mixed_precision", "seed",
              "save_every_epochs", "preview_every_epochs", "keep_last_checkpoints", "run_name")


class DreamBoothOptimizerNode(_FieldsNode):
    DESCRIPTION = ("Optimizer details (betas, epsilon, momentum, weight decay, gradient clipping), EMA, and the "
                   "optimizer's memory savers: fused_backward and weights_dtype.")
    FIELDS = ("adam_beta1", "adam_beta2", "adam_epsilon", "sgd_momentum", "weight_decay", "max_grad_norm",
              "use_ema", "ema_decay", "ema_on_cpu", "fused_backward", "weights_dtype")


class DreamBoothAdvancedNode(_FieldsNode):
    DESCRIPTION = ("Advanced training settings: LoRA target layers, memory savers, attention, VAE precision, noise "
                   "and loss extras, text encoder details, prior preservation mode, pauses, preview sampler.")
    FIELDS = ("lora_unet_targets", "lora_text_encoder_targets",
              "gradient_checkpointing", "set_grads_to_none", "attention", "vae_dtype", "noise_scheduler",
              "zero_terminal_snr", "offset_noise", "min_snr_gamma", "freeze_clip_norm", "clip_skip",
              "prior_mode", "prior_loss_weight", "pause_after_epochs", "pause_seconds", "preview_scheduler",
              "preview_steps", "preview_cfg", "frozen_dtype", "auto_fit", "masked_loss", "unmasked_weight",
              "normalize_masked_area")


class DreamBoothImagicNode(_FieldsNode):
    DESCRIPTION = ("Imagic (Kawar et al. 2023; the A1111 extension's 'Train Imagic Only'): edit one real photo by a "
                   "target text. The concept holds exactly one instance image; its instance_prompt is the target "
                   "text. Stage 1 optimises the text embedding, stage 2 fine-tunes the UNet (LoRA with use_lora); "
                   "SampleTrained's imagic_alpha then goes from the photo (0) to the edit (1).")
    FIELDS = ("train_imagic_only", "imagic_embed_steps", "imagic_embed_lr", "imagic_unet_steps", "imagic_unet_lr")


class DreamBoothValidationNode(_FieldsNode):
    DESCRIPTION = ("Validation during training (which checkpoint is good): the subject loss at fixed noise and "
                   "timesteps on held-out or training images, the prior drift against the base model, a sample grid "
                   "beside the base model's at each checkpoint; keep_best keeps the best checkpoint, early_stop ends "
                   "a run that stopped improving; TensorBoard event files.")
    FIELDS = ("validate_every_steps", "validation_images", "validation_prompt", "validation_samples", "keep_best",
              "best_drift_ceiling", "early_stop", "tensorboard")

    def build(self, config=None, **widgets):
        """A validation_images folder is found like a concept's (relative: in the input folder first) and checked
        against the file-access rule before anything looks at it."""
        value = str(widgets.get("validation_images") or "").strip()
        if value and not value.lstrip("-").isdigit():
            from .concepts import resolve_folder
            from .paths import check_path

            widgets["validation_images"] = check_path(resolve_folder(value), "DreamBoothValidation validation_images")
        return super().build(config=config, **widgets)


# DataSettings has no field metadata (it belongs to the data module): widgets spelled out here, ranges as in
# DataSettings.validate; a test checks every DataSettings field has a widget with the dataclass default.
_DATA_DEFAULTS = DataSettings()
_DATA_WIDGETS = {
    "resolution": ("INT", {"min": 64, "max": 4096, "step": 64,
                           "tooltip": "Training resolution (multiple of 64); with bucketing, buckets keep about "
                                      "resolution x resolution pixels."}),
    "bucketing": ("BOOLEAN", {"tooltip": "Aspect-ratio buckets: train each image near its own aspect ratio "
                                         "instead of cropping everything square."}),
    "bucket_min_side": ("INT", {"min": 0, "max": 8192, "step": 64,
                                "tooltip": "Smallest bucket side (multiple of 64, at most the resolution). 0 = auto: "
                                           "256, or the resolution when that is smaller."}),
    "bucket_max_side": ("INT", {"min": 0, "max": 8192, "step": 64,
                                "tooltip": "Largest bucket side (multiple of 64, at least the resolution). 0 = auto: "
                                           "1024, or the resolution when that is larger."}),
    "center_crop": ("BOOLEAN", {"tooltip": "Without bucketing: crop the centre square (on) or squash the whole "
                                           "image to a square (off)."}),
    "random_flip": ("BOOLEAN", {"tooltip": "Flip half of the images horizontally (avoid for asymmetric "
                                           "subjects and text)."}),
    "background_color": ("STRING", {"multiline": False,
                                    "tooltip": "Colour that transparent pixels are composited on: '#ffffff', "
                                               "'white' or '255,255,255'."}),
    "on_bad_image": (list(ON_BAD_IMAGE), {"tooltip": "Unreadable or broken images: 'skip' reports and skips "
                                                     "them, 'stop' refuses to train."}),
    "cache_latents": ("BOOLEAN", {"tooltip": "VAE-encode every image once and reuse the latents (faster; the "
                                             "VAE sample is still drawn fresh each step)."}),
    "cache_text_embeds": ("BOOLEAN", {"tooltip": "Encode captions once when the text encoder is not training."}),
    "cache_mode": (list(CACHE_MODES), {"tooltip": "'disk': caches are kept and reused by later runs; "
                                                  "'memory': this run only."}),
    "long_captions": (list(LONG_CAPTIONS), {"tooltip": "Captions over 75 tokens: 'truncate' them, or 'chunk' "
                                                       "(encode in 75-token parts, concatenated)."}),
    "shuffle_tags": ("BOOLEAN", {"tooltip": "Shuffle the comma-separated tags of each caption every epoch."}),
    "keep_tokens": ("INT", {"min": 0, "max": 1000, "step": 1,
                            "tooltip": "With shuffle_tags: how many leading tags stay in place."}),
    "caption_dropout": ("FLOAT", {"min": 0.0, "max": 1.0, "step": 0.01, "round": False,
                                  "tooltip": "Fraction of steps trained with an empty caption (helps the "
                                             "unconditional prediction; 0 = off)."}),
}


# auto (None) data settings: the widget value that means auto
_DATA_AUTO = {"bucket_min_side": 0, "bucket_max_side": 0}


def _data_widget(name: str):
    kind, options = _DATA_WIDGETS[name]
    default = getattr(_DATA_DEFAULTS, name)
    return (kind, {"default": _DATA_AUTO[name] if default is None else default, **options})


def _from_data_widget(name: str, value):
    if name in _DATA_AUTO and value == _DATA_AUTO[name]:
        return None
    return float(value) if name == "caption_dropout" else value


class DreamBoothDataNode:
    DESCRIPTION = "Dataset-wide image, caption and cache settings (resolution, buckets, crops, flips, caches)."
    RETURN_TYPES = _RETURN_TYPES
    RETURN_NAMES = _RETURN_NAMES
    OUTPUT_TOOLTIPS = _OUTPUT_TOOLTIPS
    FUNCTION = "configure"
    CATEGORY = CATEGORY
    FIELDS = tuple(_DATA_WIDGETS)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {name: _data_widget(name) for name in cls.FIELDS}, "optional": dict(_CONFIG_INPUT),
                "hidden": dict(_HIDDEN)}

    def build(self, config=None, **widgets):
        unknown = sorted(set(widgets) - set(self.FIELDS))
        if unknown:
            raise TypeError(f"DreamBoothDataNode: unexpected inputs {unknown}")
        base = _start(config)
        data = dataclasses.replace(base.data, **{k: _from_data_widget(k, v) for k, v in widgets.items()})
        return (_check(base.replace(data=data), "DreamBoothDataNode"),)

    def configure(self, config=None, model=None, unique_id=None, prompt=None, **widgets):
        (settings,) = self.build(config=config, **widgets)
        return _with_estimate(settings, model, unique_id, prompt)


NODE_CLASS_MAPPINGS = {
    "DreamBoothSettings": DreamBoothSettingsNode,
    "DreamBoothOptimizer": DreamBoothOptimizerNode,
    "DreamBoothAdvanced": DreamBoothAdvancedNode,
    "DreamBoothData": DreamBoothDataNode,
    "DreamBoothImagic": DreamBoothImagicNode,
    "DreamBoothValidation": DreamBoothValidationNode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DreamBoothSettings": "DreamBooth Settings",
    "DreamBoothOptimizer": "DreamBooth Optimizer",
    "DreamBoothAdvanced": "DreamBooth Advanced",
    "DreamBoothData": "DreamBooth Data",
    "DreamBoothImagic": "DreamBooth Imagic",
    "DreamBoothValidation": "DreamBooth Validation",
}

__all__ = ["DreamBoothSettingsNode", "DreamBoothOptimizerNode", "DreamBoothAdvancedNode", "DreamBoothDataNode",
           "DreamBoothImagicNode", "DreamBoothValidationNode",
           "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
