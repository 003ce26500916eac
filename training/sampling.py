"""Image generation from an SDModel: used by SampleTrained, training previews and class-image generation.

Prompts are encoded by `models.text` (so clip skip and long-prompt handling are identical to training), then
handed to diffusers' pipelines as embeddings. Each image gets its own CPU generator seeded `seed + i`, which
makes an image depend only on its prompt and seed, not on its batch (up to float rounding of batched kernels).
"""
from __future__ import annotations

from .models.components import SD_NOISE_SCHEDULE

# name → (diffusers class, extra config); names are the stable contract used by nodes and settings.
SCHEDULERS = {
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                         "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SCHEDULER_NAMES = tuple(SCHEDULERS)
MAX_SEED = 2 ** 64 - 1      # torch.Generator.manual_seed takes 0..2^64-1 (ComfyUI's seed widgets too)


class SamplingInterrupted(Exception):
    """Raised when `should_stop()` returns True between denoising steps."""


def make_scheduler(name: str, prediction_type: str = "epsilon", zero_terminal_snr: bool = False):
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    config = {**SD_NOISE_SCHEDULE, **extra, "prediction_type": prediction_type}
    if zero_terminal_snr:
        # a zero-SNR model must start sampling from the last timestep (pure noise)
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return getattr(diffusers, cls_name).from_config(config)


def build_pipeline(model, scheduler: str = "euler"):
    """A diffusers pipeline sharing the model's modules (no copies), without feature extractor, image encoder or
    safety checker, and silent: no progress bar, and the import-time notices of the pipeline modules (e.g.
    transformers 5's "CLIPImageProcessor requires torchvision") are swallowed by `quiet_libraries`."""
    from .quiet import quiet_libraries

    with quiet_libraries():
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        sched = make_scheduler(scheduler, model.prediction_type, model.zero_terminal_snr)
        if model.is_sdxl:
            pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoders[0],
                                             text_encoder_2=model.text_encoders[1], tokenizer=model.tokenizers[0],
                                             tokenizer_2=model.tokenizers[1], unet=model.unet, scheduler=sched,
                                             image_encoder=None, feature_extractor=None,
                                             force_zeros_for_empty_prompt=False)
        else:
            pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoders[0],
                                           tokenizer=model.tokenizers[0], unet=model.unet, scheduler=sched,
                                           safety_checker=None, feature_extractor=None, image_encoder=None,
                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_size(model, width: int, height: int):
    step = model.vae_scale_factor * 2 ** (len(model.unet.config.block_out_channels) - 1)
    if width % step or height % step or width <= 0 or height <= 0:
        raise ValueError(f"width/height {width}x{height}: must be positive multiples of {step} for this model")


def generate(model, prompts, negative_prompt="", steps: int = 20, cfg: float = 7.0, seed: int = 0,
             width: int = 512, height: int = 512, batch_size: int = 1, scheduler: str = "euler",
             clip_skip: int | None = None, long_prompts: str = "truncate", progress=None, should_stop=None,
             imagic_alpha: float = 0.7):
    """Images as a (B, H, W, C) float tensor in [0, 1] (ComfyUI's IMAGE layout).

    `prompts`: one prompt (repeated `batch_size` times) or a list (one image each, batch_size ignored).
    An Imagic model (training.imagic) is conditioned on imagic_alpha * target + (1 - imagic_alpha) * optimised
    embedding instead of the prompts' (0 = the photo, 1 = the edit, > 1 allowed); other models ignore imagic_alpha.
    Image i uses seed `seed + i`. `progress(done, total)` is called after each step; `should_stop()` is polled
    between steps and raises SamplingInterrupted.
    """
    import torch

    from .models.imagic_embeddings import is_imagic
    from .models.text import check_clip_skip, encode_prompts

    prompts = [prompts] * batch_size if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompt given")
    if steps < 1:
        raise ValueError(f"steps={steps}: must be at least 1")
    _check_size(model, width, height)
    if not (0 <= int(seed) and int(seed) + len(prompts) - 1 <= MAX_SEED):
        raise ValueError(f"seed {seed}: image i uses seed + i, which must be 0..{MAX_SEED} for all "
                         f"{len(prompts)} image(s)")
    check_clip_skip(model, clip_skip)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    pipe = build_pipeline(model, scheduler)

    def on_step_end(_pipe, i, _t, kwargs):
        if progress is not None:
            progress(i + 1, steps)
        if should_stop is not None and should_stop():
            raise SamplingInterrupted(f"sampling stopped at step {i + 1}/{steps}")
        return kwargs

    with torch.no_grad():
        pos = encode_prompts(model, prompts, clip_skip, long_prompts)
        chunks = pos.embeds.shape[1] // 77
        neg = encode_prompts(model, negatives, clip_skip, long_prompts, min_chunks=chunks)
        if neg.embeds.shape[1] > pos.embeds.shape[1]:      # a longer negative: pad the positive to match
            pos = encode_prompts(model, prompts, clip_skip, long_prompts, min_chunks=neg.embeds.shape[1] // 77)
        if is_imagic(model):
            pos, neg = _imagic_conditioning(model, float(imagic_alpha), len(prompts), neg)
        generators = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(len(prompts))]
        kwargs = dict(prompt_embeds=pos.embeds, negative_prompt_embeds=neg.embeds, num_inference_steps=steps,
                      guidance_scale=cfg, width=width, height=height, generator=generators, output_type="pt",
                      callback_on_step_end=on_step_end)
        if model.is_sdxl:
            kwargs.update(pooled_prompt_embeds=pos.pooled, negative_pooled_prompt_embeds=neg.pooled)
        images = pipe(**kwargs).images
    return images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().contiguous()


def _imagic_conditioning(model, alpha: float, n: int, neg):
    """(positive, negative) TextEmbeds: the interpolated Imagic embedding for `n` images, and the negative cut to
    its length (a chunked negative longer than 75 tokens keeps its first window)."""
    import math

    from .models.imagic_embeddings import interpolated
    from .models.text import TextEmbeds

    if not math.isfinite(alpha):
        raise ValueError(f"imagic_alpha {alpha}: must be a finite number (0 = the photo, 1 = the edit)")
    embeds, pooled = interpolated(model, alpha)
    embeds = embeds.to(device=neg.embeds.device, dtype=neg.embeds.dtype).expand(n, -1, -1).contiguous()
    if pooled is not None:
        pooled = pooled.to(device=neg.pooled.device, dtype=neg.pooled.dtype).expand(n, -1).contiguous()
    neg = TextEmbeds(neg.embeds[:, :embeds.shape[1]], neg.pooled)
    return TextEmbeds(embeds, pooled), neg


def to_pil(images) -> list:
    """(B,H,W,C) 0..1 tensor → PIL images."""
    import numpy as np
    from PIL import Image

    arr = (images.clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
