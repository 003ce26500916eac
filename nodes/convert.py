"""DreamBoothToComfy: DB_MODEL → ComfyUI's own MODEL, CLIP and VAE (inside ComfyUI only).

A freshly trained model can then feed KSampler, LoraLoader, CLIPTextEncode ... in the same graph, without
saving a checkpoint and loading it again. The conversion is exactly the one a save + CheckpointLoaderSimple
round trip does: adapters are merged (on a copy), the weights are laid out as a single-file checkpoint
(training.models.to_single_file_state) and handed to ComfyUI's own loader
(comfy.sd.load_state_dict_guess_config, what CheckpointLoaderSimple calls), so ComfyUI builds its usual objects.
"""
from __future__ import annotations

from ..training.models.state_dict import DTYPE_CHOICES
from . import comfy_compat as compat

CATEGORY = "DreamBooth"
DTYPES = list(DTYPE_CHOICES)      # a list: ComfyUI takes a list (not a tuple) as a combo


class ComfyUIRequired(RuntimeError):
    """The node needs ComfyUI's own modules (its MODEL/CLIP/VAE objects only exist inside ComfyUI)."""


def _require_comfyui():
    if not compat.in_comfyui():
        raise ComfyUIRequired(
            "DreamBooth To ComfyUI only runs inside ComfyUI: its MODEL/CLIP/VAE outputs are ComfyUI objects for "
            "ComfyUI's own nodes (KSampler, LoraLoader ...). Headless, save the model with SaveCheckpoint or SaveLoRA, "
            "or sample it with SampleTrained / `comfyui-dreambooth sample`.")
    import comfy.sd            # already loaded by ComfyUI before any custom node: these imports are free
    import folder_paths

    return comfy.sd, folder_paths


def _comfy_state_dict(model, dtype: str, use_ema: bool) -> dict:
    """The model as a single-file (LDM layout) state dict, adapters merged in; the input model is untouched."""
    from ..training.export.checkpoint import plain_model
    from ..training.models import to_single_file_state

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if use_ema and getattr(model, "ema_unet", None) is None:
        raise ValueError("use_ema is on but this model has no EMA weights: train with use_ema on, or turn use_ema "
                         "off to convert the raw trained weights")
    return to_single_file_state(plain_model(model), dtype=dtype, use_ema=use_ema)


def _match_prediction_type(patcher, model):
    """ComfyUI guesses the prediction type from the weights (SD2 by a heuristic, SD1 always epsilon); we know it.

    When the guess differs, patch the sampling object the way ComfyUI's ModelSamplingDiscrete node does.
    """
    import comfy.model_base
    import comfy.model_sampling

    wanted_v = model.prediction_type == "v_prediction"
    wanted_type = comfy.model_base.ModelType.V_PREDICTION if wanted_v else comfy.model_base.ModelType.EPS
    config = patcher.model.model_config
    zsnr_now = bool(getattr(config, "sampling_settings", {}).get("zsnr", False))
    if patcher.model.model_type == wanted_type and zsnr_now == bool(model.zero_terminal_snr):
        return patcher
    prediction = comfy.model_sampling.V_PREDICTION if wanted_v else comfy.model_sampling.EPS

    class ModelSamplingAdvanced(comfy.model_sampling.ModelSamplingDiscrete, prediction):
        pass

    patched = patcher.clone()
    patched.add_object_patch("model_sampling", ModelSamplingAdvanced(config, zsnr=bool(model.zero_terminal_snr)))
    return patched


def to_comfy(model, *, dtype: str = "fp16", use_ema: bool = False):
    """(ModelPatcher, CLIP, VAE) for a DB_MODEL; ComfyUIRequired outside ComfyUI, RuntimeError when ComfyUI
    does not recognise the architecture."""
    comfy_sd, folder_paths = _require_comfyui()
    state = _comfy_state_dict(model, dtype, use_ema)
    what = f"{model.family} model" + (f" ({model.source})" if getattr(model, "source", "") else "")
    try:
        out = comfy_sd.load_state_dict_guess_config(state, output_vae=True, output_clip=True,
                                                    embedding_directory=folder_paths.get_folder_paths("embeddings"))
    except Exception as exc:
        raise RuntimeError(f"DreamBooth To ComfyUI: ComfyUI could not load this {what}: {type(exc).__name__}: {exc}. "
                           "ComfyUI recognises SD1.x / SD2.x / SDXL with their standard layer sizes.") from exc
    if out is None or out[0] is None or out[1] is None or out[2] is None:
        raise RuntimeError(f"DreamBooth To ComfyUI: ComfyUI did not recognise this {what} as a checkpoint (it "
                           "recognises SD1.x / SD2.x / SDXL with their standard layer sizes); save it with "
                           "SaveCheckpoint and use SampleTrained, or check the base model.")
    patcher, clip, vae = out[:3]
    return _match_prediction_type(patcher, model), clip, vae


class DreamBoothToComfy:
    """Hand a DreamBooth model (base or freshly trained, LoRA merged in) to ComfyUI's own nodes as MODEL, CLIP and
    VAE: KSampler, LoraLoader, CLIPTextEncode, VAEDecode... in the same graph, without saving and reloading.
    Inside ComfyUI only."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = ("ComfyUI's diffusion model (as CheckpointLoaderSimple gives it): KSampler, LoraLoader...",
                       "ComfyUI's text encoder(s): CLIPTextEncode, LoraLoader...",
                       "ComfyUI's VAE: VAEDecode, VAEEncode...")
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("DB_MODEL", {"tooltip": "The model to hand over: TrainDreamBooth's output (adapters are "
                                                  "merged on a copy) or LoadBaseModel's. It is not modified."}),
                "dtype": (DTYPES, {"default": "fp16",
                                   "tooltip": "Precision of the weights handed to ComfyUI, as if saved with "
                                              "SaveCheckpoint at this dtype (ComfyUI then picks its own compute "
                                              "precision). fp16 halves the memory of the hand-over."}),
            },
            "optional": {
                "use_ema": ("BOOLEAN", {"default": False,
                                        "tooltip": "Hand over the EMA (averaged) weights instead of the last raw "
                                                   "ones. Only for models trained with use_ema on."}),
            },
        }

    def convert(self, model, dtype="fp16", use_ema=False):
        return to_comfy(model, dtype=dtype, use_ema=use_ema)


NODE_CLASS_MAPPINGS = {"DreamBoothToComfy": DreamBoothToComfy}
NODE_DISPLAY_NAME_MAPPINGS = {"DreamBoothToComfy": "DreamBooth To ComfyUI (MODEL, CLIP, VAE)"}

__all__ = ["DreamBoothToComfy", "ComfyUIRequired", "to_comfy", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
