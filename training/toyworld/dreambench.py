"""DreamBench in miniature: train a subject into the toy base with the pack's own trainer, sample it with the pack's
own sampler, and read the samples with the evaluator.

Metrics (the DreamBooth paper's, in this world):
- subject_fidelity: share of "a {token} toy" samples that show the subject (evaluate.SubjectModel.shows);
- subject_similarity: their mean colour-layout agreement with the instance images (the DINO / CLIP-I analogue);
- prompt_fidelity: share of "a {token} toy on a {background} background" samples with the asked background
  (the CLIP-T analogue); recontext_subject: the share of those that still show the subject;
- pres: share of "a toy" samples that show the subject (prior preservation: lower is better);
- div: diversity of "a toy" samples (evaluate.diversity; compare with the base's).
Used by bench/quality.py (the table), the guard tests and the demo.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field

from .evaluate import SubjectModel, analyse, calibrate_subject, diversity
from .world import CLASS_NOUN, Subject, caption, draw_subject, instance_prompt

TOKEN = "sks"
CLASS_PROMPT = caption()      # "a toy"
SAMPLE_STEPS = 20
# CFG 4: where the base follows the colours it is asked for best (base_quality, 324 samples: 95.4 % at 4, 95.8 at 3,
# 93.5 at 5, 84.7 at 7.5). Above that this v-prediction, zero-terminal-SNR base oversaturates: a red toy comes out
# orange, and a fine-tuned subject's red half orange or yellow, which the evaluator rightly reads as other colours
SAMPLE_CFG = 4.0
SAMPLER = "euler"


@dataclass
class Variant:
    """One row of the table: how the subject is trained (every field is a DreamBoothSettings choice)."""
    name: str
    use_lora: bool = True
    prior: str = "none"              # none | class_images | base_model
    text_encoder: bool = True        # the text encoder trains (text_encoder_ratio 1) or stays frozen (0)
    steps: int = 300
    learning_rate: float = 1e-3
    text_encoder_lr: float | None = None
    lora_rank: int = 8
    class_images_per_image: int = 10
    prior_loss_weight: float = 1.0
    batch_size: int = 2
    held_out: int = 0                # fresh renders of the subject drawn as the validation_images folder
    extra: dict = field(default_factory=dict)    # any other DreamBoothSettings fields


# the settings that work on the toy base (bench/quality.py's rows; the demo and the example workflow use FULL)
# LoRA: the text encoder's adapter at a tenth of the UNet's rate (at the same rate it moves the words around the
# token, and the colours they ask for, with it); seed-unstable: on the split circle at CFG 4, 0.83 at seed 0 and
# 0.46 / 0.08 / 0.46 at seeds 1-3
LORA = Variant("LoRA", use_lora=True, learning_rate=1e-3, text_encoder_lr=1e-4)
LORA_PRIOR = Variant("LoRA + prior preservation", use_lora=True, prior="class_images", learning_rate=1e-3,
                     text_encoder_lr=1e-4)
# the full fine-tune trains the UNet only (text encoder frozen: the diffusers DreamBooth script's default): on the
# toy base that drew the subject in 0.96-1.0 of the samples over two seeds (at CFG 7.5), with the text encoder
# trained at the same rate 0.25-0.67 (the token's neighbours move too, and with them the colours it asks for)
FULL = Variant("full fine-tune", use_lora=False, text_encoder=False, learning_rate=2e-4, steps=400)
# 600 steps: half of each batch is class images (the guard's prior row, GUARD_FULL_PRIOR, says what 400 missed)
FULL_PRIOR = Variant("full + prior preservation", use_lora=False, text_encoder=False, prior="class_images",
                     learning_rate=2e-4, steps=600)
# the text encoder trained at the UNet's rate: the background words move with the token, so a background shared by
# every instance image can leak into prompts that ask for another (bench/quality.py's masked-loss rows)
FULL_TE = Variant("full fine-tune, text encoder trained", use_lora=False, text_encoder=True, learning_rate=2e-4,
                  steps=400)
# the full fine-tune trained twice as long, measured on the checkpoint keep_best chooses (validation and a kept
# checkpoint every 51 steps: 17 epochs of 3 steps): at 800 steps the dotted heart is drawn in 0.79 of samples against
# 0.21 at 400, the striped square in 0.17 against 0.5 (seed 0, 24 samples), so no one length suits every subject
FULL_BEST = Variant("full fine-tune, keep_best of 800 steps", use_lora=False, text_encoder=False,
                    learning_rate=2e-4, steps=800,
                    extra=dict(validate_every_steps=51, keep_best=True, save_every_epochs=17,
                               keep_last_checkpoints=1))
# the same, keep_best choosing by the loss on 5 other renders of the subject (validation_images, a folder) instead
# of on the training images
FULL_BEST_HELD_OUT = dataclasses.replace(FULL_BEST, name="full fine-tune, keep_best of 800 steps, 5 held-out images",
                                         held_out=5)
BASE_PRIOR = Variant("LoRA + base_model prior", use_lora=True, prior="base_model", learning_rate=1e-3)
FROZEN_TE = Variant("LoRA, text encoder frozen", use_lora=True, text_encoder=False, learning_rate=1e-3)
VARIANTS = [LORA, LORA_PRIOR, FULL, FULL_PRIOR, BASE_PRIOR, FROZEN_TE, FULL_BEST, FULL_BEST_HELD_OUT]
# the guard tests' runs (tests/test_toyworld_guard.py): the same settings, fewer steps
GUARD_LORA = Variant("guard LoRA", use_lora=True, learning_rate=1e-3, text_encoder_lr=1e-4, steps=300)
GUARD_FULL = Variant("guard full", use_lora=False, text_encoder=False, learning_rate=2e-4, steps=400)
GUARD_LORA_PRIOR = Variant("guard LoRA + prior", use_lora=True, prior="class_images", learning_rate=1e-3,
                           text_encoder_lr=1e-4, steps=300, class_images_per_image=4)
# 600 steps: with class images in the batch a step holds half as many instance examples, and at 400 the run learnt
# the subject so little (fidelity 0.08-0.33) that with its prior loss dropped the class had nothing to drift to
# (PRES 0.08, the sabotage not caught); at 600 (24 samples, seeds 0 / 1): fidelity 0.83 / 0.63, PRES 0.13 / 0.0, and
# with the prior loss dropped PRES 0.88 / 0.96
GUARD_FULL_PRIOR = Variant("guard full + prior", use_lora=False, text_encoder=False, prior="class_images",
                           learning_rate=2e-4, steps=600, class_images_per_image=4)


def write_instance_images(subject: Subject, folder: str, count: int = 5, seed: int = 0) -> list:
    """Draw `count` instance images of `subject` into `folder` (PNG); returns the images."""
    os.makedirs(folder, exist_ok=True)
    images = draw_subject(subject, count, seed=seed)
    for i, im in enumerate(images):
        im.save(os.path.join(folder, f"{subject.name}_{i:02d}.png"))
    return images


def settings_for(variant: Variant, *, seed: int = 0, run_name: str = "toyworld"):
    """DreamBoothSettings of one variant on the toy base (64 px, fp32 on a CPU, no checkpoints or previews)."""
    from ..data.settings import DataSettings
    from ..settings import DreamBoothSettings

    kw = dict(use_lora=variant.use_lora, lora_rank=variant.lora_rank, lora_alpha=float(variant.lora_rank),
              learning_rate=variant.learning_rate, text_encoder_lr=variant.text_encoder_lr,
              steps_per_image=0, max_train_steps=variant.steps, batch_size=variant.batch_size,
              text_encoder_ratio=1.0 if variant.text_encoder else 0.0, mixed_precision="no",
              gradient_checkpointing=False, lr_scheduler="constant", save_every_epochs=0, preview_every_epochs=0,
              prior_mode="base_model" if variant.prior == "base_model" else "class_images",
              prior_loss_weight=variant.prior_loss_weight if variant.prior != "none" else None,
              seed=seed, run_name=run_name,
              data=DataSettings(resolution=64, bucket_min_side=64, bucket_max_side=64, cache_mode="memory"))
    kw.update(variant.extra)
    return DreamBoothSettings(**kw)


def concept_for(variant: Variant, instance_dir: str, class_dir: str, count: int):
    from ..data.settings import ConceptSettings

    prior_images = variant.class_images_per_image if variant.prior == "class_images" else 0
    return ConceptSettings(instance_dir=instance_dir, instance_prompt=instance_prompt(TOKEN),
                           instance_token=TOKEN, class_token=CLASS_NOUN, class_prompt=CLASS_PROMPT,
                           class_dir=class_dir if prior_images else "", num_class_images_per_image=prior_images,
                           class_steps=SAMPLE_STEPS, class_guidance_scale=SAMPLE_CFG, concept_type="object",
                           prior_loss_weight=variant.prior_loss_weight,
                           sample_prompt=instance_prompt(TOKEN))


def train_variant(base, variant: Variant, instance_dir: str, work_dir: str, *, count: int, seed: int = 0,
                  callbacks=None, subject: Subject | None = None):
    """Train `variant` with the pack's trainer; returns its TrainResult. Class images (when asked) are generated
    by the base model itself into work_dir/class_images (shared by the variants that use them); a variant's
    `held_out` renders of `subject` (another seed than the instance images') into work_dir/held_out, its
    validation_images folder."""
    from ..trainer import train

    settings = settings_for(variant, seed=seed)
    if variant.held_out:
        if subject is None:
            raise ValueError(f"{variant.name}: held_out renders need the subject (train_variant(..., subject=...))")
        folder = os.path.join(work_dir, "held_out")
        write_instance_images(subject, folder, variant.held_out, seed=seed + 7919)    # not the instance renders
        settings = settings.replace(validation_images=folder)
    problems = settings.validate()
    if problems:
        raise ValueError("; ".join(problems))
    concept = concept_for(variant, instance_dir, os.path.join(work_dir, "class_images"), count)
    return train(base, [concept], settings, output_root=os.path.join(work_dir, "runs"), resume="new",
                 callbacks=callbacks)


def trained_model(base, variant: Variant, result):
    """The model a variant is measured on: keep_best's checkpoint where the variant keeps one, else the final."""
    if not variant.extra.get("keep_best"):
        return result.model
    from ..reload import load_trained

    return load_trained(base, result.run_dir, which="best")


def sample(model, prompts: list[str], seed: int = 1000):
    """One image per prompt (PIL), the pack's sampler at the toy world's settings."""
    from ..sampling import generate, to_pil

    out = []
    for i in range(0, len(prompts), 32):
        images = generate(model, prompts[i:i + 32], steps=SAMPLE_STEPS, cfg=SAMPLE_CFG, seed=seed + i,
                          width=64, height=64, scheduler=SAMPLER)
        out.extend(to_pil(images))
    return out


def measure(model, subject: Subject, judge: SubjectModel, *, per_prompt: int = 16, seed: int = 1000,
            backgrounds: list[str] | None = None, keep_images: bool = False) -> dict:
    """The metrics of one model for one subject (see the module docstring)."""
    bgs = backgrounds or subject.allowed_backgrounds()
    own = [instance_prompt(TOKEN)] * per_prompt
    recontext = [instance_prompt(TOKEN, bg) for bg in bgs for _ in range(max(1, per_prompt // len(bgs) + 1))]
    prior = [CLASS_PROMPT] * per_prompt
    images = sample(model, own + recontext + prior, seed)
    readings = [analyse(im) for im in images]
    r_own = readings[:len(own)]
    r_ctx = readings[len(own):len(own) + len(recontext)]
    r_prior = readings[len(own) + len(recontext):]
    asked = [p.split(" on a ")[1].split()[0] for p in recontext]
    out = {
        "subject_fidelity": _share(judge.shows(r) for r in r_own),
        "subject_similarity": round(sum(judge.similarity(r) for r in r_own) / len(r_own), 4),
        "prompt_fidelity": _share(r.background == bg for r, bg in zip(r_ctx, asked)),
        "recontext_subject": _share(judge.shows(r) for r in r_ctx),
        "pres": _share(judge.shows(r) for r in r_prior),
        "div": round(diversity(r_prior), 4),
        "samples": len(images),
    }
    if keep_images:
        out["images"] = {"own": images[:len(own)], "recontext": images[len(own):len(own) + len(recontext)],
                         "prior": images[len(own) + len(recontext):]}
    return out


def vae_round_trip(model, images: list) -> list:
    """`images` encoded and decoded by `model`'s VAE (what a perfectly trained UNet could at best show)."""
    import numpy as np
    import torch
    from PIL import Image

    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1)
    x = x.permute(0, 3, 1, 2).to(dtype=next(model.vae.parameters()).dtype)
    with torch.no_grad():
        y = model.vae.decode(model.vae.encode(x).latent_dist.mean).sample
    y = ((y.float().clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    return [Image.fromarray(a) for a in y]


def measure_instances(subject: Subject, judge: SubjectModel, count: int = 16, seed: int = 4242,
                      through=None) -> dict:
    """The upper bound: fresh renders of the subject read like samples (subject metrics only); `through` a model:
    the renders after its VAE's round trip (the codec's bound)."""
    images = draw_subject(subject, count, seed=seed)
    if through is not None:
        images = vae_round_trip(through, images)
    readings = [analyse(im) for im in images]
    return {"subject_fidelity": _share(judge.shows(r) for r in readings),
            "subject_similarity": round(sum(judge.similarity(r) for r in readings) / len(readings), 4),
            "samples": len(images)}


def judge_for(subject: Subject, instance_images, count: int = 150) -> SubjectModel:
    return calibrate_subject(subject, instance_images, count=count)


def _share(flags) -> float:
    flags = list(flags)
    return round(sum(bool(f) for f in flags) / max(1, len(flags)), 4)


def variant_dict(v: Variant) -> dict:
    return asdict(v)


__all__ = ["Variant", "VARIANTS", "GUARD_LORA", "GUARD_FULL", "GUARD_LORA_PRIOR", "GUARD_FULL_PRIOR", "subject_fidelity", "pres", "LORA", "LORA_PRIOR", "FULL", "FULL_PRIOR", "FULL_TE", "FULL_BEST", "FULL_BEST_HELD_OUT", "BASE_PRIOR", "FROZEN_TE", "TOKEN",
           "CLASS_PROMPT", "write_instance_images", "vae_round_trip", "settings_for", "concept_for", "train_variant", "trained_model", "sample",
           "measure", "measure_instances", "judge_for", "variant_dict"]


def base_quality(model, count: int = 216, seed: int = 7) -> dict:
    """How well a base follows the vocabulary: `count` full captions at fixed seeds (colour, shape and background
    as asked) and `count // 2` "a toy" samples (normalised entropy of their colour and shape)."""
    import random

    from .evaluate import attribute_entropy
    from .world import random_world_toy

    rng = random.Random(seed)
    asked = [random_world_toy(rng) for _ in range(count)]
    prompts = [caption(toy.colour, toy.shape, bg) for toy, bg in asked]
    readings = [analyse(im) for im in sample(model, prompts, seed=seed)]
    plain = [analyse(im) for im in sample(model, [CLASS_PROMPT] * (count // 2), seed=seed + 100000)]
    return {"colour": _share(r.colour == t.colour for r, (t, _) in zip(readings, asked)),
            "background": _share(r.background == bg for r, (_, bg) in zip(readings, asked)),
            "shape": _share(r.shape == t.shape for r, (t, _) in zip(readings, asked)),
            "toy_entropy": round(attribute_entropy(plain), 4), "samples": count + count // 2}


def subject_fidelity(model, subject: Subject, judge: SubjectModel, count: int = 12, seed: int = 1000) -> float:
    """Share of `count` "a {token} toy" samples that show the subject."""
    return _share(judge.shows(analyse(im)) for im in sample(model, [instance_prompt(TOKEN)] * count, seed))


def pres(model, judge: SubjectModel, count: int = 12, seed: int = 3000) -> float:
    """Share of `count` "a toy" samples that show the subject (lower is better)."""
    return _share(judge.shows(analyse(im)) for im in sample(model, [CLASS_PROMPT] * count, seed))
