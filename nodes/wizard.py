"""PerformanceWizard: settings that fit the card, with the reason for each choice (training/memory.py)."""
from __future__ import annotations

from ..training.memory import free_device_memory_gb
from ..training.wizard import MODES, choose_settings, concept_type_of, images_in
from ..training.settings import DreamBoothSettings
from .settings import CONFIG_TYPE

CONCEPT_TYPES = ("person", "object", "style")


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
                "vram_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5, "round": False,
                                      "tooltip": "GB of GPU memory to fit. 0 = the detected device's free memory."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 64,
                                       "tooltip": "Training resolution. 0 = the family's own (SD1 512, SD2 768, "
                                                  "SDXL 1024)."}),
                "images": ("INT", {"default": 10, "min": 1, "max": 100000,
                                   "tooltip": "Number of training images (the batch size will divide it). Ignored "
                                              "when concepts are connected: they are counted."}),
                "mode": (list(MODES), {"default": "auto", "tooltip": "auto = full fine-tune when it fits, else "
                                                                      "LoRA; lora / full force one."}),
                "concept_type": (list(CONCEPT_TYPES), {"default": "person",
                                                       "tooltip": "What you train (text encoder share and epochs "
                                                                  "follow it). Ignored when concepts are "
                                                                  "connected."}),
            },
            "optional": {
                "concepts": ("CONCEPTS", {"tooltip": "Optional: the concepts to train; their images are counted "
                                                     "and their concept type used."}),
                "config": (CONFIG_TYPE, {"tooltip": "Optional settings to start from; the wizard overrides only "
                                                    "the memory-related ones."}),
            },
        }

    def choose(self, model, vram_gb, resolution, images, mode, concept_type, concepts=None, config=None):
        if config is not None and not isinstance(config, DreamBoothSettings):
            raise TypeError(f"config must be a DB_CONFIG (DreamBoothSettings), got {type(config).__name__}")
        if concepts:
            images, concept_type = images_in(concepts), concept_type_of(concepts)
        if not vram_gb:
            from .comfy_compat import comfy_torch_device

            vram_gb = round(free_device_memory_gb(comfy_torch_device()), 2)
        result = choose_settings(model, vram_gb, images=int(images), resolution=resolution or None, mode=mode,
                                 concept_type=concept_type, base=config)
        text = result.explanation + "\n\n" + result.estimate.table()
        return (result.settings, text)


NODE_CLASS_MAPPINGS = {"PerformanceWizard": PerformanceWizard}
NODE_DISPLAY_NAME_MAPPINGS = {"PerformanceWizard": "DreamBooth Performance Wizard"}
