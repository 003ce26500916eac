"""The trainer-facing API: `prepare_training_data(...) -> TrainingData` (data/dataset.py).

Everything that can go wrong with the data goes wrong here, before the first training step: settings are
validated, every image is decoded once, broken files are skipped or stop the run, missing class images are
generated, and latents / text embeddings are encoded into the cache. Training then only asks for batches:

    data = prepare_training_data(model, concepts, data_settings, cache_dir=..., text_encoder_trained=False,
                                 batch_size=2, gradient_accumulation_steps=1, seed=0)
    for epoch in range(first_epoch, epochs):
        for item in data.epoch_plan(epoch)[skip:]:      # same order on resume: a function of (seed, epoch)
            batch = data.load_batch(item, device=dev, dtype=torch.float16, generator=gen)
            # batch.latents are already x vae scaling factor; weight the loss of batch.is_prior examples by
            # batch.loss_weights (the concept's prior_loss_weight); batch.embeds is None when the text
            # encoder trains (encode batch.captions yourself then).
"""
from __future__ import annotations

import os
from typing import Callable

from .buckets import placement_for
from .cache import TensorCache
from .dataset import DatasetError, Item, PreparationStopped, TrainingData
from .report import DatasetReport, bucket_name, concept_report, concept_warnings
from .scan import ScannedImage, match_class_images, scan_concept
from .settings import ConceptSettings, DataSettings


def prepare_training_data(model, concepts: list[ConceptSettings], data_settings: DataSettings, *, cache_dir: str,
                          text_encoder_trained: bool, batch_size: int, gradient_accumulation_steps: int = 1,
                          seed: int = 0, progress: Callable[[int, int], None] | None = None,
                          should_stop: Callable[[], bool] | None = None, clip_skip: int | None = None,
                          use_class_images: bool = True, generate_class_images: bool = True,
                          class_batch_size: int = 4,
                          class_scheduler: str = "euler", log: Callable[[str], None] | None = None,
                          generate_fn=None, shard: tuple[int, int] = (0, 1),
                          sync: Callable[[], None] | None = None, masks: bool = False) -> TrainingData:
    """Scan, check, complete and encode the data of `concepts`; see the module docstring.

    - `model`: the SDModel to train (its VAE and text encoders are used where they are; move them to the
      GPU first for speed). Class images are generated with it, so pass the base model.
    - `cache_dir`: where disk caches live (`<cache_dir>/latents`, `<cache_dir>/text`); ignored for memory mode.
    - `text_encoder_trained`: True -> no text cache and `Batch.embeds` is None.
    - `clip_skip`: as for sampling (None = the model's default); part of the text cache key.
    - `use_class_images=False` trains without prior-preservation class images even where a concept asks for
      them (e.g. another prior method); `generate_class_images=False` uses the class images present but
      generates none (the report lists the shortfall).
    - `shard=(rank, processes)`: with a disk cache, this process encodes only its share of the missing entries
      (the caller waits for every process before training); memory caches are filled whole in each process.
      `sync()` (a barrier of all processes) makes every process list the missing entries before any writes.
    - `progress(done, total)` is called per stage (class images, latents, text); `log(message)` names the
      stage. `should_stop()` -> `PreparationStopped` at the next check.
    - `masks=True` (masked_loss): instance images get their masks (masks.py), cached with the latents, and
      `Batch.masks` holds them; class images are never masked.
    - Raises `DatasetError` listing every problem (settings, no usable images, broken images with
      `on_bad_image="stop"`).
    """
    say = log or (lambda msg: None)
    _validate_all(concepts, data_settings, batch_size, gradient_accumulation_steps)
    if not use_class_images:
        concepts = [c.replace(num_class_images_per_image=0) if c.uses_prior_preservation else c for c in concepts]

    say("scanning images")
    scans = [scan_concept(c) for c in concepts]
    problems = []
    for i, (c, sc) in enumerate(zip(concepts, scans)):
        if not sc.instance.images:
            problems.append(f"concept {i + 1}: no usable images in instance_dir {c.instance_dir!r}")
        if data_settings.on_bad_image == "stop":
            problems += [f"concept {i + 1}: {reason if reason.startswith(p) else p + ': ' + reason}"
                         for p, reason in sc.instance.bad + sc.classes.bad]
    if problems:
        hint = "" if data_settings.on_bad_image == "skip" else (
            "\n(fix or remove these files, or set on_bad_image='skip' to train without them)")
        raise DatasetError("cannot train on this data:\n- " + "\n- ".join(problems) + hint)

    generated = [0] * len(concepts)
    if generate_class_images:
        generated = generate_missing_class_images(model, concepts, data_settings, scans, batch_size=class_batch_size,
                                                  scheduler=class_scheduler, progress=progress,
                                                  should_stop=should_stop, generate_fn=generate_fn,
                                                  clip_skip=clip_skip, log=say)

    items: list[Item] = []
    report = DatasetReport()
    for i, (c, sc) in enumerate(zip(concepts, scans)):
        class_images, _ = match_class_images(sc, data_settings) if c.uses_prior_preservation else ([], [])
        concept_items = _items_for(sc, i, data_settings, class_images, masks)
        items += concept_items
        cr = concept_report(i, sc, data_settings=data_settings, class_generated=generated[i],
                            used_class_images=len(class_images), masked_loss=masks)
        for item in concept_items:
            if item.is_prior:
                key = bucket_name(item.bucket)
                cr.class_buckets[key] = cr.class_buckets.get(key, 0) + 1
        report.concepts.append(cr)
        report.warnings += concept_warnings(cr)
        if cr.class_missing:
            report.warnings.append(f"concept {i + 1}: {cr.class_missing} of {cr.class_required} class images "
                                   f"missing in {c.class_dir!r}; training with the {len(class_images)} present")
        small = [it.path for it in concept_items
                 if min(it.placement.original) < 0.5 * min(it.placement.target)]
        if small:
            report.warnings.append(f"concept {i + 1}: {len(small)} image(s) are less than half the training "
                                   f"size and will be upscaled (blurry): " + ", ".join(small[:5])
                                   + (" ..." if len(small) > 5 else ""))
    for line in report.notices():         # where the user looks (console, CLI), not only in the report file
        say(line)

    mode = data_settings.cache_mode
    latent_cache = TensorCache(os.path.join(cache_dir, "latents") if mode == "disk" else None, mode) \
        if data_settings.cache_latents else None
    text_cache = TensorCache(os.path.join(cache_dir, "text") if mode == "disk" else None, mode) \
        if (data_settings.cache_text_embeds and not text_encoder_trained) else None

    data = TrainingData(model, concepts, data_settings, items, batch_size=batch_size, seed=seed,
                        text_encoder_trained=text_encoder_trained, clip_skip=clip_skip,
                        latent_cache=latent_cache, text_cache=text_cache, report=report)

    if latent_cache is not None:
        say(f"caching latents ({mode})")
        data.fill_latent_cache(progress=progress, should_stop=should_stop, shard=shard, sync=sync)
        report.cache["latents"] = latent_cache.stats()
    if text_cache is not None:
        say(f"caching text embeddings ({mode})")
        data.fill_text_cache(progress=progress, should_stop=should_stop, shard=shard, sync=sync)
        report.cache["text"] = text_cache.stats()

    data.describe_epochs(report, gradient_accumulation_steps)
    return data


def generate_missing_class_images(model, concepts, data_settings: DataSettings, scans: list | None = None, *,
                                  batch_size: int = 4, scheduler: str = "euler", progress=None, should_stop=None,
                                  generate_fn=None, clip_skip: int | None = None, log=None,
                                  shard: tuple[int, int] = (0, 1), sync: Callable[[], None] | None = None
                                  ) -> list[int]:
    """Generate the class images each prior-preservation concept lacks; `scans` (one per concept) are updated in
    place. Returns how many were generated per concept.

    Several processes share the work: each calls this with its `shard` = (rank, processes) and a `sync()` that
    waits for all of them (a barrier). Every process plans all file numbers first, then (after a sync, so no
    plan sees another's new files) makes its share of the batches; a last sync, and every process rescans."""
    from .class_images import ensure_class_images, plan_with_numbers

    say = log or (lambda msg: None)
    sync = sync or (lambda: None)
    scans = [scan_concept(c) for c in concepts] if scans is None else scans
    plans = [plan_with_numbers(c, data_settings, sc) if c.uses_prior_preservation else ([], 0)
             for c, sc in zip(concepts, scans)]
    sync()
    before = [sc.class_present for sc in scans]
    for i, (c, (todo, first)) in enumerate(zip(concepts, plans)):
        if not todo:
            continue
        say(f"concept {i + 1}: generating {len(todo)} class images in {c.class_dir}"
            + (f" ({shard[1]} processes share them)" if shard[1] > 1 else ""))
        ensure_class_images(model, c, data_settings, batch_size=batch_size, scheduler=scheduler,
                            progress=progress, should_stop=should_stop, generate_fn=generate_fn,
                            clip_skip=clip_skip, planned=(todo, first), shard=shard)
        if should_stop is not None and should_stop():
            raise PreparationStopped("stopped while generating class images")
    sync()
    generated = [0] * len(concepts)
    for i, (c, (todo, _)) in enumerate(zip(concepts, plans)):
        if todo:
            scans[i] = scan_concept(c)
            generated[i] = max(0, scans[i].class_present - before[i])
    return generated


def _validate_all(concepts: list[ConceptSettings], data_settings: DataSettings, batch_size: int,
                  grad_accum: int) -> None:
    problems = [f"data settings: {p}" for p in data_settings.validate()]
    if not concepts:
        problems.append("no concepts: connect at least one DreamBooth Concept node")
    for i, c in enumerate(concepts):
        problems += [f"concept {i + 1}: {p}" for p in c.validate()]
    if batch_size < 1:
        problems.append(f"batch_size = {batch_size}; use 1 or more")
    if grad_accum < 1:
        problems.append(f"gradient_accumulation_steps = {grad_accum}; use 1 or more")
    if problems:
        raise DatasetError("cannot prepare the training data:\n- " + "\n- ".join(problems))


def _items_for(scan, ci: int, data: DataSettings, class_images: list[ScannedImage], masks: bool = False
               ) -> list[Item]:
    def make(img: ScannedImage, is_prior: bool) -> Item:
        return Item(path=img.path, content_hash=img.info.content_hash, concept_index=ci, is_prior=is_prior,
                    caption=img.caption, placement=placement_for(img.info.width, img.info.height, data),
                    has_alpha=img.info.has_alpha,
                    mask=scan.masks.found.get(img.path) if masks and not is_prior else None)

    return [make(img, False) for img in scan.instance.images] + [make(img, True) for img in class_images]


__all__ = ["prepare_training_data", "generate_missing_class_images"]
