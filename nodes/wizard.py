"""PerformanceWizard: settings that fit the card, with the reason for each choice (training/memory.py).

The explanation is shown on the node itself (like the settings nodes' estimate, web/memory_estimate.js) and names
every setting of a connected config it changed, from what to what.
"""
from __future__ import annotations

import math
import os

from ..training.devices import free_device_memory_gb
from ..training.distributed import process_info
from ..training.settings import DreamBoothSettings, recommended_learning_rate
from ..training.wizard import MODES, choose_settings, concept_type_of, images_in
from .settings import CONFIG_TYPE

CONCEPT_TYPES = ("person", "object", "style")
MAX_NODE_VRAM_GB = 1024.0     # the vram_gb widget's maximum


class PerformanceWizard:
    DESCRIPTION = ("Chooses training settings that fit your card's memory (like the A1111 extension's Performance "
                   "Wizard): full fine-tune when it fits (mode auto), else LoRA, turning on memory savings in order "
                   "(gradient checkpointing, 8-bit / Adafactor optimizer, fused backward, smaller batch, bf16 "
                   "weights, fp8 frozen weights, ...) until the estimate fits. The text output explains each choice "
                   "and its speed cost. Chain DreamBooth settings nodes after it to change anything else.")
    RETURN_TYPES = (CONFIG_TYPE, "STRING")
    RETURN_NAMES = ("config", "explanation")
    OUTPUT_TOOLTIPS = ("The chosen settings; connect to TrainDreamBooth or another settings node.",
                       "What was chosen, why, its speed cost, and the memory estimate per part.")
    FUNCTION = "choose"
    CATEGORY = "DreamBooth/settings"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("DB_MODEL", {"tooltip": "The base model to train (its architecture decides the sizes)."}),
                "vram_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": MAX_NODE_VRAM_GB, "step": 0.5, "round": False,
                                      "tooltip": "GB of GPU memory to fit. 0 = the detected GPU's free memory (on a "
                                                 "server without a GPU: the free system memory)."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64,
                                       "tooltip": "Training resolution. 0 = the family's own (SD1 512, SD2 768, "
                                                  "SDXL 1024)."}),
                "images": ("INT", {"default": 10, "min": 1, "max": 100000,
                                   "tooltip": "Number of training images (the batch size will divide it). Ignored "
                                              "when concepts are connected: they are counted."}),
                "mode": (list(MODES), {"default": "auto", "tooltip": "auto = full fine-tune when it fits, else "
                                                                      "LoRA (a connected config with use_lora on "
                                                                      "stays LoRA); lora / full force one."}),
                "concept_type": (list(CONCEPT_TYPES), {"default": "person",
                                                       "tooltip": "What you train (text encoder share and epochs "
                                                                  "follow it). Ignored when concepts are "
                                                                  "connected."}),
            },
            "optional": {
                "concepts": ("CONCEPTS", {"tooltip": "Optional: the concepts to train; their images are counted "
                                                     "and their concept type used."}),
                "config": (CONFIG_TYPE, {"tooltip": "Optional settings to start from; the wizard overrides only "
                                                    "the memory-related ones, and lists each one it changed."}),
            },
        }

    def choose(self, model, vram_gb, resolution, images, mode, concept_type, concepts=None, config=None):
        if config is not None and not isinstance(config, DreamBoothSettings):
            raise TypeError(f"config must be a DB_CONFIG (DreamBoothSettings), got {type(config).__name__}")
        if concepts:
            images, concept_type = images_in(concepts), concept_type_of(concepts)
            if images < 1:
                folders = ", ".join(str(getattr(c, "instance_dir", c)) for c in concepts)
                raise ValueError(f"the connected concepts hold no training images (in {folders}); add images to "
                                 "the concept folders, or check their paths")
        if not (isinstance(vram_gb, (int, float)) and math.isfinite(vram_gb) and 0 <= vram_gb <= MAX_NODE_VRAM_GB):
            raise ValueError(f"PerformanceWizard vram_gb = {vram_gb!r}: give the card's memory in GB, 0 (the "
                             f"detected GPU's free memory) to {MAX_NODE_VRAM_GB:g}")
        note = ""
        if not vram_gb:
            vram_gb, note = detected_memory_gb()
        result = choose_settings(model, vram_gb, images=int(images), resolution=resolution or None, mode=mode,
                                 concept_type=concept_type, base=config, processes=process_info()[1])
        parts = [note] if note else []
        parts.append(result.explanation)
        if config is not None:
            parts.append(changes_text(config, result.settings))
        parts.append(result.estimate.table())
        text = "\n\n".join(parts)
        return {"ui": {"text": [text]}, "result": (result.settings, text)}


def detected_memory_gb() -> tuple[float, str]:
    """(GB to plan for, a note) for vram_gb = 0: the GPU's free memory; on a server without one (training then
    runs in system memory) the free system memory, said in the note."""
    from .comfy_compat import comfy_torch_device

    device = comfy_torch_device()
    try:
        return round(free_device_memory_gb(device), 2), ""
    except ValueError:
        pass
    free = _free_system_memory_gb()
    if free is None:
        return 1024.0, (f"no GPU found (device {device}) and the free system memory is unknown: planned without a "
                        "memory limit; set vram_gb to plan for a card")
    return round(free, 2), (f"no GPU found (device {device}): planned for the {free:.1f} GB of system memory free "
                            "now, where training runs; set vram_gb to plan for a card")


def _free_system_memory_gb() -> float | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1024 ** 3
    except (AttributeError, ValueError, OSError):
        return None


def _flat(settings: DreamBoothSettings) -> dict:
    out = {}
    for key, value in settings.to_dict().items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "auto" if value is None else str(value)


def changes_text(before: DreamBoothSettings, after: DreamBoothSettings) -> str:
    """The settings of the connected config the wizard changed, "name: old -> new" one a line."""
    old, new = _flat(before), _flat(after)
    lines = []
    for key in new:
        if old.get(key) == new[key]:
            continue
        shown = _shown(new[key])
        if key == "learning_rate" and new[key] is None:
            shown = f"auto ({recommended_learning_rate(after.use_lora, after.optimizer):g} for "
            shown += f"{'LoRA' if after.use_lora else 'a full fine-tune'} with {after.optimizer})"
        lines.append(f"- {key}: {_shown(old.get(key))} -> {shown}")
    if not lines:
        return "the connected settings are kept as they are (nothing changed)."
    return "changed in the connected settings:\n" + "\n".join(lines)


NODE_CLASS_MAPPINGS = {"PerformanceWizard": PerformanceWizard}
NODE_DISPLAY_NAME_MAPPINGS = {"PerformanceWizard": "DreamBooth Performance Wizard"}
