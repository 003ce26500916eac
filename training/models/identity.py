"""Model identity: prediction type and zero-terminal SNR, read from the weights and the file's own markers.

Never from the file name: a stock `v2-1_512-ema-pruned` is epsilon, a merge named `...base...` may be v.
Each answer carries where it came from (`Identity.*_source`), which LoadBaseModel and `info` show.

Prediction type, first match wins:
  1. the user's explicit choice (LoadBaseModel's prediction_type widget, `--prediction-type`)
  2. a `v_pred` key in the state dict (ComfyUI's marker; ComfyUI itself reads it for SDXL only, we for every family)
  3. a sidecar `<stem>.yaml` LDM config with `parameterization: "v"` / `"eps"` (what A1111 reads)
  4. the pack's own metadata (stored config), then `modelspec.prediction_type` / ComfyUI's `modelspec.predict_key`;
     for diffusers folders also scheduler/scheduler_config.json `prediction_type`
  5. SD2 only, ComfyUI's weights rule (comfy/supported_models.py SD20.model_type): a 4-input-channel UNet whose
     `output_blocks.11.1.transformer_blocks.0.norm1.bias` has population std > 0.09 is v-prediction; tensor absent
     or inpainting UNet → epsilon
  6. the family default: epsilon
Zero-terminal SNR, first match wins: a `ztsnr` key; the sidecar yaml (`rescale_betas_zero_snr` /
`zero_terminal_snr`); the pack's metadata; a diffusers scheduler's `rescale_betas_zero_snr`; else off.

Saving writes the markers back (see `checkpoint_markers` / `modelspec_identity`), so a saved model reloads with
the same identity here, in ComfyUI and in A1111.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

from .components import PREDICTION_TYPES

# ComfyUI: comfy/supported_models.py SD20.model_type (key under the "model.diffusion_model." UNet prefix)
SD2_VPRED_TENSOR = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_VPRED_STD_THRESHOLD = 0.09
MODELSPEC_VERSION = "1.0.1"
SIDECAR_MAX_BYTES = 1 << 20


@dataclass
class Identity:
    prediction_type: str
    prediction_type_source: str
    zero_terminal_snr: bool
    zero_terminal_snr_source: str

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Readers for each kind of evidence; each returns (value, source) or None when it says nothing
# --------------------------------------------------------------------------------------------------
def _pred_word(value) -> str | None:
    v = str(value or "").strip().strip("'\"").lower()
    if v in ("v", "v_prediction", "v-prediction", "vpred", "v_pred"):
        return "v_prediction"
    if v in ("eps", "epsilon"):
        return "epsilon"
    return None


def _bool_word(value) -> bool | None:
    v = str(value).strip().strip("'\"").lower()
    if v in ("true", "yes", "on", "1"):
        return True
    if v in ("false", "no", "off", "0"):
        return False
    return None


def sidecar_yaml_path(path: str) -> str:
    """`model.safetensors` → `model.yaml` (A1111: find_checkpoint_config_near_filename)."""
    return os.path.splitext(path)[0] + ".yaml"


def read_sidecar(path: str) -> dict:
    """What a sidecar `<stem>.yaml` next to a single-file checkpoint says: {"path", "prediction_type",
    "zero_terminal_snr"} (None = not stated); {} when there is no readable sidecar.

    Read as text with a line regex (no YAML library, nothing is constructed or executed). A1111's configs keep
    `parameterization` under model.params; it appears nowhere else in an LDM config.
    """
    yaml_path = sidecar_yaml_path(path)
    if os.path.isdir(path) or not os.path.isfile(yaml_path):
        return {}
    try:
        with open(yaml_path, "rb") as f:
            text = f.read(SIDECAR_MAX_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return {}
    found = {"path": yaml_path, "prediction_type": None, "zero_terminal_snr": None}
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line)
        m = re.match(r"\s*([A-Za-z_]+)\s*:\s*(\S[^\n]*?)\s*$", line)
        if not m:
            continue
        key, value = m[1].lower(), m[2]
        if key == "parameterization" and found["prediction_type"] is None:
            found["prediction_type"] = _pred_word(value)
        elif key in ("rescale_betas_zero_snr", "zero_terminal_snr") and found["zero_terminal_snr"] is None:
            found["zero_terminal_snr"] = _bool_word(value)
    return found


def sd2_weights_rule(in_channels: int, bias) -> tuple[str, str]:
    """ComfyUI's SD2 v-prediction test on the norm bias tensor (or None when absent)."""
    if in_channels != 4:
        return "epsilon", f"sd2 UNet with {in_channels} input channels (inpainting): epsilon, as ComfyUI"
    if bias is None:
        return "epsilon", f"sd2: no {SD2_VPRED_TENSOR} (non-standard UNet): epsilon, as ComfyUI"
    import torch

    std = float(torch.std(bias.detach().float(), unbiased=False))
    if std > SD2_VPRED_STD_THRESHOLD:
        return "v_prediction", f"sd2 norm-bias std {std:.4f} > {SD2_VPRED_STD_THRESHOLD}"
    return "epsilon", f"sd2 norm-bias std {std:.4f} <= {SD2_VPRED_STD_THRESHOLD}"


def _metadata_prediction(metadata: dict, stored: dict):
    pred = stored.get("prediction_type")
    if pred in PREDICTION_TYPES:
        return pred, "pack metadata (comfyui_dreambooth.config)"
    for key in ("modelspec.prediction_type", "modelspec.predict_key"):
        pred = _pred_word(metadata.get(key))
        if pred:
            return pred, f"{key} = {metadata[key]}"
    return None


def resolve(requested: str | None, family: str, *, flags=(), sidecar: dict | None = None,
            metadata: dict | None = None, stored: dict | None = None, scheduler: dict | None = None,
            weights_rule=None) -> Identity:
    """Apply the precedence in this module's docstring. `weights_rule` is a callable giving (pred, source) for
    SD2 (called only when nothing above it decided, so the tensor is read only then)."""
    requested = requested or "auto"
    if requested not in ("auto", *PREDICTION_TYPES):
        raise ValueError(f"prediction_type {requested!r} is not one of auto, epsilon, v_prediction")
    sidecar, metadata, stored, scheduler = sidecar or {}, metadata or {}, stored or {}, scheduler or {}
    yaml_name = os.path.basename(sidecar.get("path", ""))

    def detected():
        if "v_pred" in flags:
            return "v_prediction", "'v_pred' key in the state dict"
        if sidecar.get("prediction_type"):
            word = "v" if sidecar["prediction_type"] == "v_prediction" else "eps"
            return sidecar["prediction_type"], f"sidecar {yaml_name}: parameterization {word}"
        found = _metadata_prediction(metadata, stored)
        if found:
            return found
        if _pred_word(scheduler.get("prediction_type")):
            return (_pred_word(scheduler["prediction_type"]),
                    "diffusers scheduler/scheduler_config.json prediction_type")
        if family == "sd2" and weights_rule is not None:
            return weights_rule()
        return "epsilon", f"family default ({family}: epsilon)"

    if requested == "auto":
        pred, pred_source = detected()
    else:
        auto_pred, auto_source = detected()
        pred = requested
        pred_source = f"explicit choice (prediction_type={requested})"
        if auto_pred != requested:
            pred_source += f"; the file says {auto_pred}: {auto_source}"

    if "ztsnr" in flags:
        zt, zt_source = True, "'ztsnr' key in the state dict"
    elif sidecar.get("zero_terminal_snr") is not None:
        zt, zt_source = sidecar["zero_terminal_snr"], f"sidecar {yaml_name}"
    elif isinstance(stored.get("zero_terminal_snr"), bool):
        zt, zt_source = stored["zero_terminal_snr"], "pack metadata (comfyui_dreambooth.config)"
    elif isinstance(scheduler.get("rescale_betas_zero_snr"), bool):
        zt, zt_source = (scheduler["rescale_betas_zero_snr"],
                         "diffusers scheduler/scheduler_config.json rescale_betas_zero_snr")
    else:
        zt, zt_source = False, "no marker (default off)"
    return Identity(pred, pred_source, bool(zt), zt_source)


# --------------------------------------------------------------------------------------------------
# Markers written on save
# --------------------------------------------------------------------------------------------------
def default_resolution(model) -> int:
    if model.family == "sdxl":
        return 1024
    return 768 if model.family == "sd2" and model.prediction_type == "v_prediction" else 512


def modelspec_architecture(model, adapter: str | None = None) -> str:
    if model.family == "sdxl":
        arch = "stable-diffusion-xl-v1-base"
    elif model.family == "sd2":
        arch = "stable-diffusion-v2-768-v" if model.prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    else:
        arch = "stable-diffusion-v1"
    return f"{arch}/{adapter}" if adapter else arch


def modelspec_identity(model) -> dict:
    """The prediction-type keys readers look for: ModelSpec's `modelspec.prediction_type` and the
    `modelspec.predict_key` ComfyUI's CheckpointSave writes (comfy_extras/nodes_model_merging.py)."""
    word = "v" if model.prediction_type == "v_prediction" else "epsilon"
    return {"modelspec.prediction_type": word, "modelspec.predict_key": word}


def base_checkpoint_modelspec(model, title: str) -> dict:
    """modelspec.* keys every full checkpoint gets (callers may add more, e.g. export's date and training)."""
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": modelspec_architecture(model),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": f"{default_resolution(model)}x{default_resolution(model)}",
        **modelspec_identity(model),
    }


def checkpoint_markers(model) -> dict:
    """Empty marker tensors for the state dict: `v_pred` for every v-prediction model (ComfyUI's own save writes it
    for any V_PREDICTION model, model_base.BaseModel.state_dict_for_saving; its SD2 loader ignores it and measures
    the weights instead), `ztsnr` for a zero-terminal-SNR model."""
    import torch

    out = {}
    if model.prediction_type == "v_prediction":
        out["v_pred"] = torch.tensor([])
    if model.zero_terminal_snr:
        out["ztsnr"] = torch.tensor([])
    return out
