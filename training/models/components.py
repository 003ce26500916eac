"""`SDModel`: what travels on the `DB_MODEL` socket.

Holds diffusers modules (UNet, VAE, text encoder(s)) plus what is needed to save them back exactly and to
name the run (family, prediction type, source path and hash). Nodes never mutate one they received:
`replace()` returns a shallow copy with some parts swapped, which is how training hands back a new model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# The noise schedule every SD 1.x / 2.x / XL checkpoint was trained with.
SD_NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
}


@dataclass
class SDModel:
    family: str                       # "sd1" | "sd2" | "sdxl"
    prediction_type: str              # "epsilon" | "v_prediction"
    unet: Any                         # diffusers UNet2DConditionModel
    vae: Any                          # diffusers AutoencoderKL
    text_encoders: list               # [CLIPTextModel] or, for SDXL, [CLIPTextModel, CLIPTextModelWithProjection]
    tokenizers: list                  # one CLIPTokenizer per text encoder
    source: str = ""                  # file or folder it was loaded from ("" for built in memory)
    source_hash: str = ""             # content hash of the source (names runs and caches)
    # original-layout tensors that have no place in the diffusers modules (e.g. OpenCLIP's logit_scale),
    # kept so a single-file save returns the same key set.
    extras: dict = field(default_factory=dict)
    # text-encoder layers a diffusers folder already dropped (SD2 folders ship 23 of OpenCLIP-H's 24 layers)
    dropped_text_layers: int = 0
    zero_terminal_snr: bool = False   # trained with a rescaled, zero-terminal-SNR schedule
    ema_unet: Any = None              # optional EMA copy of the UNet, produced by training
    # free-form: training summary, base model, adapter info; "identity": prediction type / zero-terminal SNR and
    # where each came from (set by loading, see models/identity.py)
    metadata: dict = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def default_clip_skip(self) -> int:
        """1 = last layer. SD2 and SDXL were trained on the penultimate layer (their own default)."""
        return 1 if self.family == "sd1" else 2

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self):
        return next(self.unet.parameters()).device

    def modules(self) -> list:
        return [m for m in (self.unet, self.vae, *self.text_encoders, self.ema_unet) if m is not None]

    def to(self, device) -> "SDModel":
        """Move every module to `device` (in place: placement, not content; returns self)."""
        for m in self.modules():
            m.to(device)
        return self

    def replace(self, **changes) -> "SDModel":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line, plus where the prediction type and zero-terminal SNR came from when loading recorded it."""
        text = f"{self.family} ({self.prediction_type}) from {self.source or 'memory'}"
        ident = self.metadata.get("identity") or {}
        if (ident.get("prediction_type"), ident.get("zero_terminal_snr")) == (self.prediction_type,
                                                                            self.zero_terminal_snr):
            zt = "on" if self.zero_terminal_snr else "off"
            text += (f"\nprediction type {self.prediction_type} ({ident.get('prediction_type_source')}); "
                     f"zero-terminal SNR {zt} ({ident.get('zero_terminal_snr_source')})")
        return text
