"""Settings for concept data: one `ConceptSettings` per concept node, one `DataSettings` per training run.

Field names are the ComfyUI node input names, and workflows are shared between users, so they are a stable
contract: rename nothing. Both dataclasses follow the project's settings pattern: `validate()` returns every
problem at once (as sentences naming the setting, the value and the fix), `to_dict()` / `from_dict()`
round-trip through JSON.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import Any

CONCEPT_TYPES = ("person", "object", "style")
ON_BAD_IMAGE = ("skip", "stop")
CACHE_MODES = ("disk", "memory")
LONG_CAPTIONS = ("truncate", "chunk")
FILEWORDS = "[filewords]"

# Presets from the A1111 sd_dreambooth_extension guide: "Step Ratio of Text Encoder Training" 0.7 for faces
# and 0.2 for styles; "Training Steps Per Image (Epochs)" 100-175 per instance image (nitrosocke's guide,
# quoted in the extension's README). Faces need the most epochs; objects sit between (the text encoder helps
# bind a new word to a thing, but less than for a face); styles the fewest, as they usually have more images.
_CONCEPT_TYPE_PRESETS = {
    "person": {"text_encoder_ratio": 0.7, "steps_per_image": 150},
    "object": {"text_encoder_ratio": 0.5, "steps_per_image": 125},
    "style": {"text_encoder_ratio": 0.2, "steps_per_image": 100},
}


def concept_type_defaults(concept_type: str) -> dict:
    """Training presets for a concept type: {"text_encoder_ratio": float, "steps_per_image": int}.

    `text_encoder_ratio` is the fraction of the training steps during which the text encoder trains;
    `steps_per_image` times the number of instance images gives a starting total step count.
    """
    if concept_type not in _CONCEPT_TYPE_PRESETS:
        raise ValueError(f"concept_type {concept_type!r} is not one of {', '.join(CONCEPT_TYPES)}")
    return dict(_CONCEPT_TYPE_PRESETS[concept_type])


def _coerce(value: Any, default: Any) -> Any:
    """Cast a JSON value to the type of the field's default (JSON has no int/float distinction)."""
    if isinstance(default, bool):
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, str):
        return "" if value is None else str(value)
    return value


class _SettingsMixin:
    # fields whose default is None ("auto": resolved from other settings) -> the type of a value set explicitly
    _AUTO_KINDS: dict = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, strict: bool = False):
        """Build from a dict (e.g. parsed JSON). Unknown keys are ignored, or rejected with `strict=True`;
        missing keys take their defaults, so configs written by older versions still load."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if strict and unknown:
            raise ValueError(f"{cls.__name__}: unknown settings {unknown}; known are {sorted(known)}")
        defaults = cls()
        kwargs = {}
        for name, value in data.items():
            if name not in known:
                continue
            default = getattr(defaults, name)
            if default is None and name in cls._AUTO_KINDS:
                if value is None:
                    kwargs[name] = None
                    continue
                default = cls._AUTO_KINDS[name]()
            try:
                kwargs[name] = _coerce(value, default)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{cls.__name__}.{name}: cannot use {value!r} ({e})") from None
        return cls(**kwargs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def _check_range(problems: list, name: str, value, lo, hi, hint: str = "") -> None:
    if not (lo <= value <= hi):
        problems.append(f"{name} = {value!r} is out of range; use {lo} to {hi}{hint}")


def _check_choice(problems: list, name: str, value, choices) -> None:
    if value not in choices:
        problems.append(f"{name} = {value!r} is not allowed; use one of: {', '.join(choices)}")


@dataclass
class ConceptSettings(_SettingsMixin):
    """One concept: a folder of instance images, how to caption them, and prior-preservation class images."""

    instance_dir: str = ""                 # folder of instance images (with optional same-name .txt captions)
    instance_prompt: str = FILEWORDS       # prompt for instance images; may contain [filewords]
    instance_token: str = ""               # the rare word naming the subject, e.g. "sks" / "ohwx"
    class_dir: str = ""                    # folder of class (regularisation) images; missing ones are generated
    class_prompt: str = ""                 # prompt used to generate class images and to caption them
    class_token: str = ""                  # the class word, e.g. "dog" / "man"
    class_negative_prompt: str = ""        # negative prompt for class-image generation
    num_class_images_per_image: int = 0    # class images wanted per instance image; 0 = no prior preservation
    class_guidance_scale: float = 7.5      # CFG for class-image generation
    class_steps: int = 40                  # sampler steps for class-image generation
    sample_prompt: str = ""                # prompt for preview samples ("" = instance prompt with the token)
    concept_type: str = "person"           # "person" | "object" | "style": presets (see concept_type_defaults)
    repeats: int = 1                       # how many times each instance image appears per epoch
    prior_loss_weight: float = 1.0         # weight of the class-image (prior) loss for this concept
    mask_dir: str = ""                     # masked loss: folder of masks named like the images (kohya's layout)

    # left out of to_dict() while at their default, so the identity of runs made before they existed is unchanged
    _OMIT_AT_DEFAULT = ("mask_dir",)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for name in self._OMIT_AT_DEFAULT:
            if out[name] == "":
                del out[name]
        return out

    @property
    def uses_prior_preservation(self) -> bool:
        return self.num_class_images_per_image > 0

    def validate(self, *, check_paths: bool = True) -> list[str]:
        """All problems at once, as sentences naming the setting, the value and the fix.

        `check_paths=False` skips file-system checks (for settings read on another machine)."""
        p: list[str] = []
        if not self.instance_dir.strip():
            p.append("instance_dir is empty; set it to the folder holding your instance (subject) images")
        elif check_paths and not os.path.isdir(self.instance_dir):
            p.append(f"instance_dir = {self.instance_dir!r} is not an existing folder; check the path")
        if not self.instance_prompt.strip() and not self.instance_token.strip():
            p.append("instance_prompt and instance_token are both empty; set instance_prompt (e.g. "
                     "'[filewords]' or 'photo of sks dog') or at least instance_token")
        for name in ("instance_token", "class_token"):
            value = getattr(self, name)
            if any(c in value for c in ",[]"):
                p.append(f"{name} = {value!r} contains ',', '[' or ']'; use a plain word such as 'sks'")
        if self.instance_token.strip() and self.instance_token.strip() == self.class_token.strip():
            p.append(f"instance_token and class_token are both {self.instance_token!r}; the instance token must "
                     "be a different, rare word (e.g. 'sks' or 'ohwx')")
        _check_range(p, "num_class_images_per_image", self.num_class_images_per_image, 0, 1000,
                     " (0 disables prior preservation)")
        _check_range(p, "class_guidance_scale", self.class_guidance_scale, 1.0, 30.0)
        _check_range(p, "class_steps", self.class_steps, 1, 500)
        _check_choice(p, "concept_type", self.concept_type, CONCEPT_TYPES)
        _check_range(p, "repeats", self.repeats, 1, 10000)
        _check_range(p, "prior_loss_weight", self.prior_loss_weight, 0.0, 100.0)
        if self.mask_dir.strip() and check_paths:
            if not os.path.isdir(self.mask_dir):
                p.append(f"mask_dir = {self.mask_dir!r} is not an existing folder; set it to the folder of masks "
                         "named like the instance images, or leave it empty")
            elif os.path.isdir(self.instance_dir) and os.path.samefile(self.mask_dir, self.instance_dir):
                p.append("mask_dir is the same folder as instance_dir; masks named like their images need their own "
                         "folder (or name them <image name>-masklabel.png beside the images and leave mask_dir "
                         "empty)")
        if self.uses_prior_preservation:
            if not self.class_dir.strip():
                p.append(f"num_class_images_per_image = {self.num_class_images_per_image} needs class_dir: set "
                         "a folder for class images (missing ones are generated there)")
            elif check_paths and os.path.exists(self.class_dir) and not os.path.isdir(self.class_dir):
                p.append(f"class_dir = {self.class_dir!r} exists but is not a folder")
            elif (check_paths and self.instance_dir.strip() and os.path.isdir(self.instance_dir)
                  and os.path.isdir(self.class_dir)
                  and os.path.samefile(self.class_dir, self.instance_dir)):
                p.append("class_dir is the same folder as instance_dir; class images must live in their own folder")
            if not self.class_prompt.strip() and not self.class_token.strip():
                p.append("prior preservation is on but class_prompt and class_token are empty; set class_prompt "
                         "(e.g. 'photo of a dog') so class images can be generated and captioned")
        return p


@dataclass
class DataSettings(_SettingsMixin):
    """Dataset-wide image, caption and cache settings (part of the training config, not of a concept)."""

    resolution: int = 512                  # target side; bucketing keeps about resolution² pixels
    bucketing: bool = True                 # aspect-ratio buckets instead of square crops
    bucket_min_side: int | None = None     # smallest bucket side (multiple of 64); None = auto: 256, at most resolution
    bucket_max_side: int | None = None     # largest bucket side (multiple of 64); None = auto: 1024, at least resolution
    center_crop: bool = True               # without bucketing: True = crop the centre square, False = squash
    random_flip: bool = False              # horizontal flip half of the time
    background_color: str = "#ffffff"      # transparent pixels are composited on this colour
    on_bad_image: str = "skip"             # "skip" reports and skips broken images, "stop" refuses to train
    cache_latents: bool = True             # VAE-encode each image once and reuse it
    cache_text_embeds: bool = True         # encode captions once when the text encoder is not trained
    cache_mode: str = "disk"               # "disk" (reused across runs) | "memory" (this run only)
    long_captions: str = "truncate"        # captions over 75 tokens: "truncate" or "chunk" (encode in 75-token parts)
    shuffle_tags: bool = False             # shuffle comma-separated tags of each caption every epoch
    keep_tokens: int = 0                   # with shuffle_tags: number of leading tags kept in place
    caption_dropout: float = 0.0           # fraction of examples trained with an empty caption

    # A default must never conflict with a value the user chose: the bucket sides are "auto" (None) unless set,
    # and auto follows the resolution (256 / 1024 at the usual 512-1024; a resolution of 128 gets a minimum of
    # 128, one of 2048 a maximum of 2048). A value set explicitly is used as given and checked.
    _AUTO_KINDS = {"bucket_min_side": int, "bucket_max_side": int}
    AUTO_BUCKET_MIN_SIDE = 256
    AUTO_BUCKET_MAX_SIDE = 1024

    @property
    def effective_bucket_min_side(self) -> int:
        if self.bucket_min_side is not None:
            return self.bucket_min_side
        return min(self.AUTO_BUCKET_MIN_SIDE, self.resolution)

    @property
    def effective_bucket_max_side(self) -> int:
        if self.bucket_max_side is not None:
            return self.bucket_max_side
        return max(self.AUTO_BUCKET_MAX_SIDE, self.resolution)

    def resolved(self) -> "DataSettings":
        """A copy with every auto (None) value filled in."""
        return self.replace(bucket_min_side=self.effective_bucket_min_side,
                            bucket_max_side=self.effective_bucket_max_side)

    def validate(self) -> list[str]:
        p: list[str] = []
        _check_range(p, "resolution", self.resolution, 64, 4096)
        if self.resolution % 64:
            p.append(f"resolution = {self.resolution} is not a multiple of 64; use e.g. "
                     f"{max(64, round(self.resolution / 64) * 64)}")
        for name in ("bucket_min_side", "bucket_max_side"):
            value = getattr(self, name)
            if value is None:          # auto
                continue
            _check_range(p, name, value, 64, 8192, " (or auto)")
            if value % 64:
                p.append(f"{name} = {value} is not a multiple of 64; use {max(64, round(value / 64) * 64)}")
        if self.bucketing:
            if self.bucket_min_side is not None and self.bucket_min_side > self.resolution:
                p.append(f"bucket_min_side = {self.bucket_min_side} is larger than resolution = {self.resolution}; "
                         "lower it to at most the resolution, or set it to auto (0 on the node) to follow "
                         "the resolution")
            if self.bucket_max_side is not None and self.bucket_max_side < self.resolution:
                p.append(f"bucket_max_side = {self.bucket_max_side} is smaller than resolution = {self.resolution}; "
                         "raise it to at least the resolution, or set it to auto (0 on the node) to follow "
                         "the resolution")
        try:
            parse_color(self.background_color)
        except ValueError as e:
            p.append(f"background_color = {self.background_color!r}: {e}")
        _check_choice(p, "on_bad_image", self.on_bad_image, ON_BAD_IMAGE)
        _check_choice(p, "cache_mode", self.cache_mode, CACHE_MODES)
        _check_choice(p, "long_captions", self.long_captions, LONG_CAPTIONS)
        _check_range(p, "keep_tokens", self.keep_tokens, 0, 1000)
        _check_range(p, "caption_dropout", self.caption_dropout, 0.0, 1.0)
        return p


def parse_color(text: str) -> tuple[int, int, int]:
    """'#rrggbb', '#rgb', 'r,g,b' or a CSS colour name -> (r, g, b)."""
    from PIL import ImageColor

    s = text.strip()
    if "," in s:
        parts = [x.strip() for x in s.split(",")]
        if len(parts) == 3 and all(x.isdigit() and 0 <= int(x) <= 255 for x in parts):
            return tuple(int(x) for x in parts)  # type: ignore[return-value]
        raise ValueError("write three numbers 0-255 separated by commas, e.g. '255,255,255'")
    try:
        rgb = ImageColor.getrgb(s)
    except ValueError:
        raise ValueError("not a colour; use '#ffffff', 'white', or '255,255,255'") from None
    return tuple(rgb[:3])  # type: ignore[return-value]


__all__ = ["ConceptSettings", "DataSettings", "concept_type_defaults", "parse_color", "CONCEPT_TYPES",
           "FILEWORDS"]
