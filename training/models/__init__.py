"""Model I/O: family detection, shape inference, single-file <-> diffusers, offline tokenizers, tiny models."""
from .components import FAMILIES, PREDICTION_TYPES, SD_NOISE_SCHEDULE, SDModel
from .detect import NotStableDiffusionError, detect_family
from .load import inspect_model, is_diffusers_folder, load_diffusers_folder, load_model, load_single_file, load_vae
from .save import save_diffusers, save_single_file, to_single_file_state
from .state_dict import ModelLoadError, file_hash, open_state_dict
from .tiny import build_tiny_model

__all__ = [
    "FAMILIES", "PREDICTION_TYPES", "SD_NOISE_SCHEDULE", "SDModel", "NotStableDiffusionError", "detect_family",
    "ModelLoadError", "file_hash", "inspect_model", "is_diffusers_folder", "load_diffusers_folder", "load_model",
    "load_single_file", "load_vae", "open_state_dict", "save_diffusers", "save_single_file", "to_single_file_state",
    "build_tiny_model",
]
