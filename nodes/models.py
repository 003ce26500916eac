"""Model nodes: LoadBaseModel (checkpoint / diffusers folder → DB_MODEL), LoadTrained (a saved LoRA or a run's checkpoint
back onto a base → DB_MODEL) and SampleTrained (DB_MODEL → IMAGE).

Thin adapters: loading and sampling live in training/models and training/sampling.
"""
from __future__ import annotations

import os

from ..training.sampling import MAX_SEED, SCHEDULER_NAMES
from . import comfy_compat as compat
from .paths import check_path, typed_path

CATEGORY = "DreamBooth"
MODEL_TYPE = "DB_MODEL"
FROM_CHECKPOINT = "(from checkpoint)"
PATH_BELOW = "(use model_path)"
DIFFUSERS_PREFIX = "diffusers/"
# the pack's own toy-world base (training/toyworld): always in the list, so the toy example runs without a download
TOY_BASE = "(toy world base, shipped: 64 px)"


def model_choices() -> list[str]:
    """Checkpoint files, then diffusers folders (as "diffusers/<name>"), the shipped toy base, the free-path
    option."""
    return [*compat.list_models("checkpoints"), *(DIFFUSERS_PREFIX + n for n in compat.list_diffusers_folders()),
            TOY_BASE, PATH_BELOW]


def resolve_model_path(model_name: str, model_path: str = "") -> str:
    """The path LoadBaseModel loads: a free path wins when given, else the chosen entry of the list."""
    if model_path.strip():
        path = typed_path(model_path)
        if not os.path.isabs(path):
            path = os.path.join(compat.input_directory(), path) if not os.path.exists(path) else path
        path = check_path(path, "LoadBaseModel model_path")      # before anything looks at it
        if not os.path.exists(path):
            raise FileNotFoundError(f"model_path {model_path!r}: no such file or folder")
        return path
    if model_name == PATH_BELOW:
        raise ValueError("model is set to '(use model_path)' but model_path is empty: type a checkpoint file or "
                         "diffusers folder path")
    if model_name == TOY_BASE:
        from ..training.toyworld.commands import base_path

        return base_path()
    if model_name.startswith(DIFFUSERS_PREFIX):
        return compat.full_model_path("diffusers", model_name[len(DIFFUSERS_PREFIX):])
    return compat.full_model_path("checkpoints", model_name)


class LoadBaseModel:
    """Load a Stable Diffusion 1.x / 2.x / XL checkpoint or diffusers folder for DreamBooth training."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL_TYPE, "STRING")
    RETURN_NAMES = ("model", "info")
    OUTPUT_TOOLTIPS = ("The loaded model (UNet, VAE, text encoders) for ConceptDataset/TrainDreamBooth/SampleTrained.",
                       "Family, prediction type and zero-terminal SNR (and what in the file decided each), and "
                       "where the model was loaded from.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (model_choices(), {"tooltip": "A checkpoint from models/checkpoints or a diffusers folder "
                                                       "from models/diffusers. Choose '(use model_path)' to type a path. "
                                                       "'(toy world base ...)' is the pack's tiny pretrained model of "
                                                       "coloured toys (64 px): DreamBooth in a minute on a CPU."}),
                "prediction_type": (["auto", "epsilon", "v_prediction"], {
                    "default": "auto",
                    "tooltip": "auto: from the file itself, never its name: a v_pred key, a sidecar <name>.yaml "
                               "(parameterization), the file's metadata, for SD2 the weights (as ComfyUI), else "
                               "epsilon. The info output says which decided. A choice here overrides all of them."}),
                "dtype": (["fp32", "fp16", "bf16"], {
                    "default": "fp32",
                    "tooltip": "Weight precision in memory. fp32 for training (mixed precision is a training "
                               "setting); fp16/bf16 halve memory for sampling-only use."}),
            },
            "optional": {
                "model_path": ("STRING", {"default": "", "tooltip": "Optional: a checkpoint file or diffusers folder "
                                                                    "path; overrides the list when not empty."}),
                "vae": ([FROM_CHECKPOINT, *compat.list_models("vae")], {
                    "default": FROM_CHECKPOINT,
                    "tooltip": "Replace the checkpoint's VAE with a VAE file from models/vae."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, model, prediction_type="auto", dtype="fp32", model_path="", vae=FROM_CHECKPOINT):
        # re-load when the file changes on disk, not only when the widgets change
        from ..training.models import file_hash

        try:
            return file_hash(resolve_model_path(model, model_path or ""))
        except (OSError, ValueError):
            return ""

    def load(self, model, prediction_type="auto", dtype="fp32", model_path="", vae=FROM_CHECKPOINT):
        from ..training.models import load_model

        path = resolve_model_path(model, model_path or "")
        vae_path = None if vae in (FROM_CHECKPOINT, "", None) else compat.full_model_path("vae", vae)
        loaded = load_model(path, prediction_type=prediction_type, vae_path=vae_path, dtype=dtype)
        loaded.to(compat.comfy_torch_device())
        return (loaded, loaded.describe())


def save_images(images, filename_prefix: str) -> list[dict]:
    """Save a (B,H,W,C) batch as PNGs under the output folder; ComfyUI's ui "images" entries."""
    from ..training.export.naming import clean_relative_name, safe_output_path
    from ..training.fsutil import atomic_path
    from ..training.sampling import to_pil

    out_root = compat.output_directory()
    rel = clean_relative_name(filename_prefix, default="dreambooth/sample")
    subfolder, stem = os.path.split(rel)
    folder = os.path.join(out_root, subfolder)
    try:     # symlinks resolved: a linked sub-folder of the output folder cannot lead outside it
        safe_output_path(out_root, rel)
        os.makedirs(folder, exist_ok=True)
        safe_output_path(out_root, rel)
    except ValueError as e:
        raise ValueError(f"SampleTrained filename_prefix: {e}") from None
    existing = [f for f in os.listdir(folder) if f.startswith(stem + "_") and f.endswith(".png")]
    counter = 1 + max([int(f[len(stem) + 1:-4].split("_")[0]) for f in existing
                       if f[len(stem) + 1:-4].split("_")[0].isdigit()] or [0])
    results = []
    for i, image in enumerate(to_pil(images)):
        name = f"{stem}_{counter + i:05d}_.png"
        with atomic_path(os.path.join(folder, name)) as tmp:
            image.save(tmp, format="PNG")
        results.append({"filename": name, "subfolder": subfolder.replace(os.sep, "/"), "type": "output"})
    return results


class SampleTrained:
    """Generate images from a DB_MODEL (a base model or a freshly trained one); shows and saves them."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The generated images (B,H,W,C, 0..1), usable by any ComfyUI image node.",)
    OUTPUT_NODE = True
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "The model to sample from (LoadBaseModel or TrainDreamBooth)."}),
                "prompt": ("STRING", {"multiline": True, "default": "a photo of sks dog",
                                      "tooltip": "What to generate; use your instance token to see the trained subject."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "What to steer away from."}),
                "steps": ("INT", {"default": 25, "min": 1, "max": 500, "tooltip": "Denoising steps."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale (how strongly to follow the prompt)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED,
                                 "tooltip": "Image i of the batch uses seed + i: the same seed gives the same image."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64, "tooltip": "Image width."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64, "tooltip": "Image height."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images to generate."}),
                "scheduler": (list(SCHEDULER_NAMES), {"default": "dpmpp_2m_karras", "tooltip": "The sampler."}),
                "clip_skip": ("INT", {"default": 0, "min": 0, "max": 12,
                                      "tooltip": "0 = the model's default (SD1: 1, SD2/SDXL: 2); 2 = penultimate "
                                                 "CLIP layer (A1111 convention)."}),
                "filename_prefix": ("STRING", {"default": "dreambooth/sample",
                                               "tooltip": "Saved as <output>/<prefix>_00001_.png; subfolders allowed, "
                                                          "nothing outside the output folder."}),
            },
            "optional": {
                "imagic_alpha": ("FLOAT", {"default": 0.7, "min": -10.0, "max": 10.0, "step": 0.05, "round": False,
                                           "tooltip": "Imagic models only (train_imagic_only): alpha x target text + "
                                                      "(1 - alpha) x optimised embedding. 0 = reconstruct the photo, "
                                                      "1 = the target edit, between interpolates, > 1 pushes the edit "
                                                      "further (0.6-0.8 usually keeps the photo best). The prompt is "
                                                      "not used for them; other models ignore this input."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, filename_prefix=None):
        """Checked when the graph is queued, before any node runs: a graph that trains first must not fail after
        training. Naming width/height here makes ComfyUI skip its own min/max for them, so the range is here too.
        Linked inputs arrive as None (checked by the sampler when they arrive)."""
        from ..training.export.naming import output_name_problem

        required = cls.INPUT_TYPES()["required"]
        problems = []
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            spec = required[name][1]
            low, high, step = spec["min"], spec["max"], spec["step"]
            if value < low:
                problems.append(f"{name} {value} must be at least {low}")
            elif value > high:
                problems.append(f"{name} {value} must be at most {high}")
            elif value % step:
                problems.append(f"{name} {value} must be a multiple of {step} (Stable Diffusion 1.x/2.x/XL build "
                                f"images from {step}-pixel blocks); use {max(low, value - value % step)}")
        problem = output_name_problem(filename_prefix, compat.output_directory(), "_00001_.png")
        if problem:
            problems.append(f"filename_prefix {problem}")
        return "; ".join(problems) or True

    def sample(self, model, prompt, negative_prompt, steps, cfg, seed, width, height, batch_size, scheduler,
               clip_skip, filename_prefix, imagic_alpha=0.7):
        from ..training.sampling import SamplingInterrupted, generate

        with compat.Progress(steps, label="sampling") as bar:
            try:
                images = generate(model, prompt, negative_prompt, steps=steps, cfg=cfg, seed=seed, width=width,
                                  height=height, batch_size=batch_size, scheduler=scheduler,
                                  clip_skip=clip_skip or None, progress=lambda d, t: bar.update_absolute(d, t),
                                  should_stop=compat.interrupt_requested, imagic_alpha=imagic_alpha)
            except SamplingInterrupted:
                compat.check_interrupt()
                raise
        ui_images = save_images(images, filename_prefix)
        return {"ui": {"images": ui_images}, "result": (images,)}


class LoadTrained:
    """Put a finished run back onto its base model after a restart: a LoRA saved by SaveLoRA (with its Imagic sidecar
    when present), or a run folder / checkpoint folder (last state or keep_best's best). Sample, validate or export
    it again from the DB_MODEL."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL_TYPE, "STRING")
    RETURN_NAMES = ("model", "info")
    OUTPUT_TOOLTIPS = ("The base model carrying the trained weights (for SampleTrained, the save nodes, "
                       "DreamBoothToComfy, or more training).", "What was loaded, from where.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, {"tooltip": "The base model the run trained on (LoadBaseModel)."}),
                "lora": ([*compat.list_models("loras"), PATH_BELOW], {
                    "tooltip": "A LoRA from models/loras written by SaveLoRA. Choose '(use model_path)' to type a "
                               "LoRA file, a run folder or a checkpoint folder instead."}),
                "which": (["last", "best"], {"default": "last",
                                             "tooltip": "For a run folder: its final state (last) or the best "
                                                        "checkpoint keep_best chose (best)."}),
            },
            "optional": {
                "path": ("STRING", {"default": "", "tooltip": "Optional: a LoRA file, a run folder "
                                                              "(<output>/dreambooth/<name>-<time>) or one of its "
                                                              "checkpoint folders; overrides the list when not "
                                                              "empty. Relative paths start in the output folder."}),
            },
        }

    def load(self, model, lora, which="last", path=""):
        from ..training.reload import load_trained

        if (path or "").strip():
            target = typed_path(path)
            if not os.path.isabs(target):
                target = os.path.join(compat.output_directory(), target)
            target = check_path(target, "LoadTrained path")
        elif lora == PATH_BELOW:
            raise ValueError("LoadTrained: lora is '(use model_path)' but path is empty; type a LoRA file, run "
                             "folder or checkpoint folder")
        else:
            target = compat.full_model_path("loras", lora)
        loaded = load_trained(model, target, which)
        where = loaded.metadata.get("loaded_from", target)
        return (loaded, f"loaded {where} onto {model.source or 'the base model'}")
