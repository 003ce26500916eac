"""Validation during training: which checkpoint is good (issue 20).

Every `validate_every_steps` optimizer steps, at each checkpoint and at the end, the model as trained so far is
measured, deterministically and without touching the training (no gradients, eval mode, the global random state
forked and restored, every draw from its own seeded generator), so the trained weights are bit-identical with
validation on and off:

- subject loss: the training loss of the validation images at fixed timesteps (one per band, TIMESTEP_BANDS) and
  fixed noise drawn once per run from the seed, per band and averaged. The images are held out from training
  (`validation_images` = N or a folder) or, when the user has none to spare, the training images themselves
  (then the loss says how well the set is memorised, not how well the subject generalises: the log says which);
- prior drift: on fixed noisy latents and timesteps, the mean squared difference between the trained model's
  prediction and the frozen base model's for the class prompt(s) and a few neutral prompts (NEUTRAL_PROMPTS).
  The base's predictions are computed once before training (no second model in memory); the number rises when
  the model forgets what the class (or the world) looks like;
- a sample grid (at each checkpoint and at the end): the instance prompt, one recontextualised prompt and the
  class prompt at fixed seeds, one row per prompt and seed, the base model's images (made once) in the first
  column, the trained model's in the second.

Numbers go to validation.jsonl in the run folder (one line per validation), grids to previews/, both to the
callbacks (the live panel) and to TensorBoard (board.py) when it is on. best.py chooses a checkpoint from them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field

from .devices import is_accelerator, to_device, to_host
from .fsutil import append_jsonl, read_jsonl
from .data.settings import FILEWORDS

# (band, timestep): a low-noise (detail), a middle and a high-noise (composition) timestep of the 1000-step schedule
TIMESTEP_BANDS = (("low", 150), ("mid", 500), ("high", 850))
NEUTRAL_PROMPTS = ("a photo", "a painting of a landscape", "a city street")
RECONTEXT = "on the beach"
LOG_NAME = "validation.jsonl"


@dataclass
class Example:
    """One validation image: its clean latent (scaled, CPU), caption and SDXL size conditioning."""

    latent: object
    caption: str
    time_ids: object = None
    noise: object = None                  # (bands, C, h, w): drawn once per run


@dataclass
class Validation:
    """What a run validates with, made once before training; `records` is the history (for best.py)."""

    source: str                           # "held-out images" / "validation folder" / "training images"
    held_out: bool
    examples: list
    drift_prompts: list = field(default_factory=list)
    drift_kinds: list = field(default_factory=list)        # "class" / "neutral" per prompt
    drift_noisy: object = None            # (P, C, h, w) fixed noisy latents
    drift_time_ids: object = None
    base_drift: object = None             # (bands, P, C, h, w): the base model's predictions, CPU fp32
    grid_prompts: list = field(default_factory=list)
    grid_seeds: list = field(default_factory=list)
    base_images: list = field(default_factory=list)       # PIL, one per (prompt, seed)
    records: list = field(default_factory=list)
    best: dict | None = None              # best.py's choice so far


def run_seed(seed: int, *parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in (seed, "validation", *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, *parts):
    import torch

    return torch.Generator("cpu").manual_seed(run_seed(seed, *parts))


# ---- before training: the images, the held-out split ------------------------------------------------------------
def held_out_count(value: str) -> int | None:
    """validation_images as a number of held-out images per concept (None: empty or a folder)."""
    value = (value or "").strip()
    return int(value) if value.isdigit() else None


def plan_validation(job) -> str:
    """Choose the validation images (and take held-out ones out of the training data) before the run's identity
    is computed; returns a line for the dataset report ("" when nothing is held out). job.validation stays None
    when validation is off."""
    settings = job.settings
    if not settings.validate_every_steps:
        return ""
    value = settings.validation_images.strip()
    n = held_out_count(value)
    data, note = job.data, ""
    if n:
        held = held_out_items(data, n)
        job.data = data.without(set(held))
        for concept in job.data.report.concepts:        # describe_epochs adds the prior examples up again
            concept.prior_examples_per_epoch = 0
        job.data.describe_epochs(job.data.report, settings.gradient_accumulation_steps)
        names = ", ".join(os.path.basename(data.items[i].path) for i in held)
        note = f"\nvalidation: {len(held)} instance image(s) held out from training: {names}"
        items, source = [data.items[i] for i in held], f"{len(held)} held-out images"
    elif value:
        items, data = _folder_items(job, value), None
        source = f"the validation folder {value}"
    else:
        items = [item for item in data.items if not item.is_prior]
        source = "the training images (no validation_images: the loss shows memorisation, not generalisation)"
    examples = [Example(latent=_clean_latent(data or job.validation_data, item), caption=item.caption,
                        time_ids=_time_ids(job, item)) for item in items]
    job.validation = Validation(source=source, held_out=bool(value), examples=examples)
    job.say(f"validation every {settings.validate_every_steps} steps and at each checkpoint, on {source}")
    return note


def held_out_items(data, n: int) -> list[int]:
    """Indices of the last `n` instance images (by file name) of each concept; a concept keeps at least one."""
    by_concept: dict[int, list[int]] = {}
    for i, item in enumerate(data.items):
        if not item.is_prior:
            by_concept.setdefault(item.concept_index, []).append(i)
    held = []
    for ci, idx in sorted(by_concept.items()):
        if len(idx) <= n:
            raise ValueError(f"validation_images = {n}: concept {ci + 1} has only {len(idx)} instance image(s), and "
                             "training needs at least one; hold out fewer, give a folder of other photos, or leave "
                             "validation_images empty (the loss is then measured on the training images)")
        held += sorted(idx, key=lambda i: os.path.basename(data.items[i].path))[-n:]
    return sorted(held)


def _folder_items(job, folder: str) -> list:
    """The images of a validation folder, prepared (scanned, bucketed, latents cached) like the first concept's."""
    from .data.prepare import prepare_training_data

    if not os.path.isdir(folder):
        raise ValueError(f"validation_images = {folder!r} is neither a number of images to hold out nor an existing "
                         "folder; give a folder of other photos of the subject, a number, or leave it empty")
    concept = job.concepts[0].replace(instance_dir=folder, num_class_images_per_image=0, repeats=1)
    job.validation_data = prepare_training_data(
        job.model_for_data, [concept], job.settings.data,
        cache_dir=os.path.join(job.output_root, "dreambooth", "cache"), text_encoder_trained=True, batch_size=1,
        seed=job.settings.seed, clip_skip=job.settings.clip_skip_or_none, use_class_images=False,
        generate_class_images=False)
    return list(job.validation_data.items)


def _clean_latent(data, item):
    """The image's latent mean (no posterior sample: the same every time), scaled as training scales it."""
    stats = data.latent_stats(item, False)
    cfg = data.model.vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return ((stats["mean"] - shift) * cfg.scaling_factor).float()


def _time_ids(job, item):
    import torch

    if not job.model.is_sdxl:
        return None
    from .models.text import sdxl_time_ids

    p = item.placement
    ids = sdxl_time_ids((p.original[1], p.original[0]), p.crop_top_left(False), (p.target[1], p.target[0]))
    return torch.as_tensor(ids, dtype=torch.float32)


# ---- before training: fixed noise, the base model's predictions and images -------------------------------------
def grid_prompts(job) -> list[str]:
    """The instance prompt, one recontextualised prompt and the class prompt (when the concept has one)."""
    c = job.concepts[0]
    subject = c.sample_prompt or c.instance_prompt
    if FILEWORDS in subject or not subject.strip():
        subject = job.validation.examples[0].caption if job.validation.examples else c.instance_token
    recontext = job.settings.validation_prompt or f"{subject}, {RECONTEXT}"
    return [p for p in (subject, recontext, c.class_prompt) if p.strip()]


def prepare_reference(job) -> None:
    """Fixed noise, and what the base model does with it (drift predictions, the grid's base column): computed
    once, before the trained copy exists, with the received model (the base, for LoRA and full fine-tune)."""
    import torch

    val, settings = job.validation, job.settings
    if val is None:
        return
    seed = settings.seed
    for i, ex in enumerate(val.examples):
        ex.noise = torch.randn((len(TIMESTEP_BANDS), *ex.latent.shape), generator=_generator(seed, "noise", i))
    classes = list(dict.fromkeys(c.class_prompt for c in job.concepts if c.class_prompt.strip()))
    val.drift_prompts = classes + list(NEUTRAL_PROMPTS)
    val.drift_kinds = ["class"] * len(classes) + ["neutral"] * len(NEUTRAL_PROMPTS)
    res, model = settings.data.resolution, job.model_for_data
    shape = (model.unet.config.in_channels, res // model.vae_scale_factor, res // model.vae_scale_factor)
    val.drift_noisy = torch.randn((len(val.drift_prompts), *shape), generator=_generator(seed, "drift"))
    if model.is_sdxl:
        from .models.text import sdxl_time_ids

        val.drift_time_ids = torch.as_tensor(sdxl_time_ids((res, res), (0, 0), (res, res)), dtype=torch.float32)
    val.grid_seeds = [seed + k for k in range(settings.validation_samples)]
    val.grid_prompts = grid_prompts(job)
    base_images = bool(val.grid_seeds and job.main)
    if settings.use_lora and not base_images:
        return
    # the received UNet waits on the host unless class images need it (trainer.place_model): here it is needed
    parked = is_accelerator(job.device) and next(model.unet.parameters()).device.type == "cpu"
    if parked:
        to_device(model.unet, job.device)
    try:
        if not settings.use_lora:     # a full fine-tune: the received model is the base (LoRA: adapter_reference)
            with _quiet_rng(job.device), torch.no_grad(), job.accelerator.autocast():
                val.base_drift = _drift_predictions(job, model, model.unet).float().cpu()
        if base_images:
            val.base_images = _sample(job, model, val.grid_prompts, val.grid_seeds)
    finally:
        if parked:
            to_host(model.unet)


def adapter_reference(job) -> None:
    """LoRA: the base's drift predictions are the trained model's with its adapters off, computed once the trained
    copy exists: the same modules, precision and kernels as every later measurement (so the drift of the untrained
    adapter is exactly 0, also with half-precision or fp8 frozen weights)."""
    import torch

    from .setup import precision
    from .setup.trainable import adapters_disabled

    if job.validation is None or not job.settings.use_lora:
        return
    tm = job.tm
    with contextlib.ExitStack() as off:
        for module in (tm.unet, *tm.text_encoders):
            off.enter_context(adapters_disabled(module))
        with _eval(job), _quiet_rng(job.device), torch.no_grad(), job.accelerator.autocast(), \
                precision.frozen_on(job.device, job.offloaded):
            job.validation.base_drift = _drift_predictions(job, tm, tm.unet).float().cpu()


@contextlib.contextmanager
def _quiet_rng(device):
    """The global random state as it was, whatever runs inside (validation draws none of its own, but a kernel or
    a library might): training's next draws are the same with validation on and off."""
    import torch

    with torch.random.fork_rng(devices=[] if device.type != "cuda" else [device]):
        yield


def _drift_predictions(job, model, unet):
    """(bands, P, C, h, w): `unet`'s predictions for the drift prompts on the fixed noisy latents."""
    import torch

    from .models.text import encode_prompts

    val, device = job.validation, job.device
    te = encode_prompts(model, val.drift_prompts, job.settings.clip_skip_or_none)
    noisy = val.drift_noisy.to(device)
    p = noisy.shape[0]
    added = None
    if model.is_sdxl:
        added = {"text_embeds": te.pooled, "time_ids": val.drift_time_ids.to(device).expand(p, -1)}
    out = []
    for _, t in TIMESTEP_BANDS:
        ts = torch.full((p,), t, device=device, dtype=torch.long)
        out.append(unet(noisy.to(unet.dtype), ts, te.embeds.to(unet.dtype), added_cond_kwargs=added).sample.float())
    return torch.stack(out)


def _sample(job, model, prompts, seeds) -> list:
    from .sampling import generate, to_pil

    s = job.settings
    images = []
    for seed in seeds:
        out = generate(model, prompts, steps=s.preview_steps, cfg=s.preview_cfg, seed=seed, width=s.data.resolution,
                       height=s.data.resolution, scheduler=s.preview_scheduler, clip_skip=s.clip_skip_or_none,
                       long_prompts=s.data.long_captions)
        images.append(to_pil(out))
    return [images[k][p] for p in range(len(prompts)) for k in range(len(seeds))]     # rows: prompt, then seed


# ---- during training -----------------------------------------------------------------------------------------
def is_due(settings, step: int, saved, total: int) -> bool:
    every = settings.validate_every_steps
    return bool(every) and (step % every == 0 or saved is not None or step == total)


def measure(job) -> dict:
    """The subject loss per band and averaged, and the prior drift, of the model as trained now."""
    import torch

    from .models.text import encode_prompts
    from .setup import precision
    from .setup.noise import per_sample_mse, training_target

    val, tm, device, sched = job.validation, job.tm, job.device, job.noise_scheduler
    clip_skip = job.settings.clip_skip_or_none
    ts = torch.tensor([t for _, t in TIMESTEP_BANDS], device=device, dtype=torch.long)
    per_band = torch.zeros(len(TIMESTEP_BANDS), dtype=torch.float64)
    with _eval(job), _quiet_rng(device), torch.no_grad(), job.accelerator.autocast(), \
            precision.frozen_on(device, job.offloaded):
        for ex in val.examples:
            x0 = ex.latent.to(device).unsqueeze(0).expand(len(ts), -1, -1, -1)
            noise = ex.noise.to(device)
            te = encode_prompts(tm, [ex.caption] * len(ts), clip_skip, job.settings.data.long_captions)
            added = None
            if tm.is_sdxl:
                added = {"text_embeds": te.pooled, "time_ids": ex.time_ids.to(device).expand(len(ts), -1)}
            pred = tm.unet(sched.add_noise(x0, noise, ts), ts, te.embeds, added_cond_kwargs=added).sample
            target = training_target(sched, x0, noise, ts, job.model.prediction_type)
            per_band += per_sample_mse(pred, target).double().cpu()
        drift = (_drift_predictions(job, tm, tm.unet).float().cpu() - val.base_drift).pow(2)
    per_band /= max(1, len(val.examples))
    drift_per_prompt = drift.flatten(2).mean(dim=2).mean(dim=0)          # (P,)
    record = {"loss": float(per_band.mean()), "images": len(val.examples)}     # (best.tie scales with images)
    record.update({f"loss_{name}": float(v) for (name, _), v in zip(TIMESTEP_BANDS, per_band)})
    record["prior_drift"] = float(drift_per_prompt.mean())
    for kind in ("class", "neutral"):
        picked = [float(d) for d, k in zip(drift_per_prompt, val.drift_kinds) if k == kind]
        if picked:
            record[f"prior_drift_{kind}"] = sum(picked) / len(picked)
    return record


@contextlib.contextmanager
def _eval(job):
    """Trained modules in eval mode (no dropout) for the measurement, back in train mode after."""
    for m in job.trained_modules:
        m.eval()
    try:
        yield
    finally:
        for m in job.trained_modules:
            m.train()


def grid(job, step: int) -> str | None:
    """The trained model's images beside the base's, saved as previews/validation-step-N.png; its path."""
    from PIL import Image

    from .setup import precision

    val = job.validation
    if not val.grid_seeds:
        return None
    with _eval(job), _quiet_rng(job.device), job.accelerator.autocast(), precision.frozen_on(job.device,
                                                                                               job.offloaded):
        trained = _sample(job, job.tm, val.grid_prompts, val.grid_seeds)
    w, h = trained[0].size
    sheet = Image.new("RGB", (2 * w, h * len(trained)), "white")
    for row, (base, now) in enumerate(zip(val.base_images, trained)):
        sheet.paste(base, (0, row * h))
        sheet.paste(now, (w, row * h))
    path = os.path.join(job.run.previews_dir, f"validation-step-{step:07d}.png")
    sheet.save(path)
    return path


def validate(job, step: int, *, checkpoint: str | None = None, with_grid: bool = False) -> dict:
    """Measure (main process), log and record one validation; returns its record."""
    record = {"step": step, **measure(job), "held_out": job.validation.held_out}
    if checkpoint:
        record["checkpoint"] = checkpoint
    if with_grid:
        record["grid"] = grid(job, step)
    job.validation.records.append(record)
    append_record(job.run.path, record)
    job.say(f"validation at step {step}: loss {record['loss']:.4g} (" + ", ".join(
        f"{name} {record['loss_' + name]:.4g}" for name, _ in TIMESTEP_BANDS) + f"), prior drift "
        f"{record['prior_drift']:.4g}")
    if job.cb.validation:
        job.cb.validation(record)
    if job.cb.preview and record.get("grid"):
        job.cb.preview([record["grid"]])
    if job.board is not None:
        job.board.validation(record)
    return record


# ---- validation.jsonl ----------------------------------------------------------------------------------------
def append_record(run_path: str, record: dict) -> None:
    append_jsonl(os.path.join(run_path, LOG_NAME), record)


def read_records(run_path: str) -> list[dict]:
    return read_jsonl(os.path.join(run_path, LOG_NAME))


def resume_records(job) -> None:
    """A resumed run keeps the validations up to its checkpoint's step (the later ones are made again)."""
    from .fsutil import atomic_write_text

    if job.validation is None or not job.main:
        return
    kept = [r for r in read_records(job.run.path) if r.get("step", 0) <= job.start_step]
    atomic_write_text(os.path.join(job.run.path, LOG_NAME), "".join(json.dumps(r) + "\n" for r in kept))
    job.validation.records = kept
    job.validation.best = job.run.read_config().get("best")


__all__ = ["TIMESTEP_BANDS", "NEUTRAL_PROMPTS", "RECONTEXT", "LOG_NAME", "Validation", "Example", "plan_validation",
           "held_out_items", "held_out_count", "prepare_reference", "adapter_reference", "grid_prompts", "is_due", "measure", "grid",
           "validate", "append_record", "read_records", "resume_records", "run_seed"]
