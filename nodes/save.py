"""Save nodes: SaveLoRA (kohya LoRA into models/loras), SaveCheckpoint (one file into models/checkpoints),
SaveDiffusers (a pipeline folder into models/diffusers).

Thin adapters over training/export. Headless the folders are <output-dir>/loras, /checkpoints, /diffusers (see
nodes/comfy_compat.py). Names are cleaned so nothing is written outside the folder; an existing file is kept and the
new one gets a "_2", "_3"... suffix unless `overwrite` is on. Each node returns the saved path.
"""
from __future__ import annotations

import os

from ..training.models.state_dict import DTYPE_CHOICES
from . import comfy_compat

DB_MODEL = "DB_MODEL"
CATEGORY = "DreamBooth/save"
DTYPES = list(DTYPE_CHOICES)      # a list: ComfyUI takes a list (not a tuple) as a combo

_DTYPE_TIP = ("Precision of the saved weights. fp16: half the size of fp32, what almost everyone uses. "
              "bf16: same size, wider range, fine for newer GPUs. fp32: exact, twice the size.")
_EMA_TIP = ("Save the EMA (averaged) weights the trainer kept instead of the last raw weights. "
            "Only available when the model was trained with use_ema on.")
_OVERWRITE_TIP = "Replace a file of the same name. Off: keep it and save as name_2, name_3, ..."
_WHICH_TIP = ("last: the weights as training ended. best: the run's best checkpoint, as keep_best chose it (the "
              "lowest validation loss under the prior drift ceiling; the training summary names it). Needs a model "
              "trained with keep_best on.")


def _target(kind: str, name: str, ext: str, overwrite: bool) -> str:
    from ..training.export.naming import safe_output_path, unique_path

    path = safe_output_path(comfy_compat.models_folder(kind), name, ext)
    return path if overwrite else unique_path(path)


def _relative(kind: str, path: str) -> str:
    return os.path.relpath(path, comfy_compat.models_folder(kind)).replace(os.sep, "/")


def _name_check(kind: str, input_name: str, name, ext: str):
    """VALIDATE_INPUTS result for a typed output name: True, or why the file system would refuse it (checked when
    the graph is queued, so a too-long name never costs a finished training run)."""
    from ..training.export.naming import output_name_problem

    problem = output_name_problem(name, comfy_compat.models_folder(kind), ext)
    return True if problem is None else f"{input_name} {problem}"


def _done(message: str, path: str, model=None) -> dict:
    chosen = model.metadata.get("chosen_checkpoint") if model is not None else None
    if chosen:
        message += f" Weights of the best checkpoint: {chosen}."
    return {"ui": {"text": [message]}, "result": (path,)}


_OPTIONAL = {"optional": {"use_ema": ("BOOLEAN", {"default": False, "tooltip": _EMA_TIP}),
                          "overwrite": ("BOOLEAN", {"default": False, "tooltip": _OVERWRITE_TIP}),
                          "which": (["last", "best"], {"default": "last", "tooltip": _WHICH_TIP})}}


def _chosen(model, which: str):
    """The model to save: as trained (last) or its run's best checkpoint (training/best.py)."""
    if which == "best":
        from ..training.best import best_model

        return best_model(model)
    if which != "last":
        raise ValueError(f"which = {which!r}: choose 'last' or 'best'")
    return model


class _SaveNode:
    """What every save node shares: one path output, an output node under DreamBooth/save."""

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True


class SaveLoRA(_SaveNode):
    """Write the trained adapters as a kohya LoRA file (ComfyUI's LoraLoader, A1111, Forge, diffusers read it)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DB_MODEL, {"tooltip": "A model trained with use_lora on (TrainDreamBooth's output)."}),
                "filename": ("STRING", {"default": "dreambooth_lora",
                                        "tooltip": "File name inside models/loras; subfolders with '/' are allowed, "
                                                   "'..' and absolute paths are stripped. .safetensors is added."}),
                "dtype": (DTYPES, {"default": "fp16", "tooltip": _DTYPE_TIP}),
            },
            **_OPTIONAL,
        }

    OUTPUT_TOOLTIPS = ("Full path of the saved LoRA file.",)

    @classmethod
    def VALIDATE_INPUTS(cls, filename=None):
        return _name_check("loras", "filename", filename, ".safetensors")
    DESCRIPTION = "Save the LoRA/LyCORIS adapters of a trained model in kohya format, with training metadata."

    def save(self, model, filename, dtype, use_ema=False, overwrite=False, which="last"):
        from ..training.export.lora import NoAdaptersError, save_kohya_lora
        from ..training.setup.adapters import has_adapters

        model = _chosen(model, which)
        if not has_adapters(model):
            raise NoAdaptersError("SaveLoRA: this model has no LoRA adapters (it was fully fine-tuned, or not "
                                  "trained with use_lora). Use SaveCheckpoint to save its full weights, or train "
                                  "with use_lora on.")
        path = _target("loras", filename, ".safetensors", overwrite)
        save_kohya_lora(model, path, dtype=dtype, use_ema=use_ema)
        name = _relative("loras", path)
        return _done(f"Saved LoRA {name} ({dtype}) to {path}; pick '{name}' in a LoraLoader.", path, model)


class SaveCheckpoint(_SaveNode):
    """Write the whole model as one checkpoint file (LoRA adapters merged in)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DB_MODEL, {"tooltip": "The model to save: trained (full or LoRA) or as loaded."}),
                "filename": ("STRING", {"default": "dreambooth",
                                        "tooltip": "File name inside models/checkpoints; subfolders with '/' are "
                                                   "allowed, '..' and absolute paths are stripped. The extension "
                                                   "follows `format`."}),
                "format": (["safetensors", "ckpt"], {
                    "default": "safetensors",
                    "tooltip": "safetensors: safe to load and fast (recommended). ckpt: pickle, only for old tools "
                               "that need it."}),
                "dtype": (DTYPES, {"default": "fp16", "tooltip": _DTYPE_TIP}),
            },
            **_OPTIONAL,
        }

    OUTPUT_TOOLTIPS = ("Full path of the saved checkpoint.",)

    @classmethod
    def VALIDATE_INPUTS(cls, filename=None):    # not `format`: a named input skips ComfyUI's own checks of it
        return _name_check("checkpoints", "filename", filename, ".safetensors")
    DESCRIPTION = ("Save the model as a single checkpoint in the original Stable Diffusion layout (loads in "
                   "CheckpointLoaderSimple, A1111, Forge). A LoRA-trained model is merged into the weights first.")

    def save(self, model, filename, format, dtype, use_ema=False, overwrite=False, which="last"):
        from ..training.export.checkpoint import export_checkpoint

        model = _chosen(model, which)
        path = _target("checkpoints", filename, "." + format, overwrite)
        export_checkpoint(model, path, dtype=dtype, use_ema=use_ema)
        name = _relative("checkpoints", path)
        return _done(f"Saved checkpoint {name} ({dtype}) to {path}; pick '{name}' in a checkpoint loader.", path,
                     model)


class SaveDiffusers(_SaveNode):
    """Write the whole model as a diffusers pipeline folder (LoRA adapters merged in)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (DB_MODEL, {"tooltip": "The model to save: trained (full or LoRA) or as loaded."}),
                "folder_name": ("STRING", {"default": "dreambooth",
                                           "tooltip": "Folder name inside models/diffusers; subfolders with '/' are "
                                                      "allowed, '..' and absolute paths are stripped."}),
                "dtype": (DTYPES, {"default": "fp16", "tooltip": _DTYPE_TIP}),
            },
            **_OPTIONAL,
        }

    OUTPUT_TOOLTIPS = ("Full path of the saved folder.",)

    @classmethod
    def VALIDATE_INPUTS(cls, folder_name=None):
        return _name_check("diffusers", "folder_name", folder_name, "")
    DESCRIPTION = ("Save the model as a diffusers folder (diffusers' from_pretrained, LoadBaseModel and "
                   "DiffusersLoader read it). A LoRA-trained model is merged into the weights first.")

    def save(self, model, folder_name, dtype, use_ema=False, overwrite=False, which="last"):
        from ..training.export.checkpoint import export_diffusers

        model = _chosen(model, which)
        path = _target("diffusers", folder_name, "", overwrite)
        export_diffusers(model, path, dtype=dtype, use_ema=use_ema)
        name = _relative("diffusers", path)
        return _done(f"Saved diffusers folder {name} ({dtype}) to {path}.", path, model)


NODE_CLASS_MAPPINGS = {"SaveLoRA": SaveLoRA, "SaveCheckpoint": SaveCheckpoint, "SaveDiffusers": SaveDiffusers}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SaveLoRA": "Save LoRA (DreamBooth)",
    "SaveCheckpoint": "Save Checkpoint (DreamBooth)",
    "SaveDiffusers": "Save Diffusers (DreamBooth)",
}
