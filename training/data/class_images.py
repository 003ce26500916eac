"""Prior-preservation class images: generate what is missing with the base model, reuse what exists.

Each instance image asks for `num_class_images_per_image` class images of its class prompt, at its own
bucket size (see `scan.match_class_images`). Generation is batched: one `generate()` call per batch of
prompts of one size, so it runs as fast as plain sampling (the A1111 extension's one-image-at-a-time
generation is what made it slow). Each image is saved as `NNNNN-<prompt words>.png` with its prompt in
`NNNNN-<prompt words>.txt`; the text file is written first, so a PNG never exists without its caption.
A re-run finds the existing files and generates only the shortfall.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .scan import ConceptScan, match_class_images, scan_concept
from .settings import ConceptSettings, DataSettings

_NUMBERED = re.compile(r"^(\d+)-")


def _slug(prompt: str, limit: int = 48) -> str:
    words = re.sub(r"[^a-z0-9]+", " ", prompt.lower()).split()
    return "_".join(words)[:limit].strip("_") or "class"


def _next_index(folder: str) -> int:
    highest = -1
    for name in os.listdir(folder):
        m = _NUMBERED.match(name)
        if m:
            highest = max(highest, int(m.group(1)))
    return highest + 1


def _save_png(image, path: str, prompt: str, info: str) -> None:
    from PIL import PngImagePlugin

    from ..fsutil import atomic_path, atomic_write_text

    atomic_write_text(os.path.splitext(path)[0] + ".txt", prompt + "\n")
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", f"{prompt}\n{info}")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=meta)


def _tensor_to_pils(images) -> list:
    import numpy as np
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def plan_class_generation(concept: ConceptSettings, data_settings: DataSettings,
                          scan: ConceptScan | None = None) -> list[tuple[str, tuple[int, int]]]:
    """The (prompt, (width, height)) of every class image still to generate, grouped by size."""
    if not concept.uses_prior_preservation:
        return []
    scan = scan or scan_concept(concept)
    _, missing = match_class_images(scan, data_settings)
    return sorted(missing, key=lambda pb: (pb[1], pb[0]))   # stable: same-size prompts become one batch


def ensure_class_images(model, concept: ConceptSettings, data_settings: DataSettings, *, batch_size: int = 4,
                        scheduler: str = "euler", progress: Callable[[int, int], None] | None = None,
                        should_stop: Callable[[], bool] | None = None, generate_fn=None,
                        clip_skip: int | None = None, planned: tuple[list, int] | None = None,
                        shard: tuple[int, int] = (0, 1)) -> list[str]:
    """Make sure `concept.class_dir` holds the class images the concept needs; return the paths to train on.

    Missing images are generated with `model` in batches of `batch_size` (same size per batch) using
    `scheduler`, `concept.class_steps`, `concept.class_guidance_scale`, `concept.class_negative_prompt` and the
    run's `clip_skip` (class images show what the base model makes of the class prompt as training encodes it);
    seeds are the file numbers, so a re-generated set is reproducible. `progress(done, total)` counts
    images; when `should_stop()` turns true, generation stops after the current batch and the paths made so
    far are returned (the caller sees fewer than required). `generate_fn` replaces
    `training.sampling.generate` (tests, benchmarks).

    Several processes: each passes the same `planned` = (todo, first file number) from `plan_with_numbers`
    (made before any of them writes) and its `shard` = (rank, processes); process r makes batches r, r + N, ...
    File names and seeds are those one process would use, so the set is the same whoever makes it. The paths
    returned are this process's share only.
    """
    if not concept.uses_prior_preservation:
        return []
    if batch_size < 1:
        raise ValueError(f"class image batch_size = {batch_size}; use 1 or more")
    os.makedirs(concept.class_dir, exist_ok=True)
    if planned is None:
        scan = scan_concept(concept)
        existing, _ = match_class_images(scan, data_settings)
        paths = [img.path for img in existing]
        todo, index = plan_class_generation(concept, data_settings, scan), _next_index(concept.class_dir)
    else:
        paths, (todo, index) = [], planned
    rank, processes = shard
    if not todo:
        return paths
    if generate_fn is None:
        from ..sampling import generate as generate_fn

    total, done, batch_number = len(todo), 0, -1
    if progress:
        progress(0, total)
    # PNG encoding + fsync take ~50 ms per 512² image: done by writer threads while the sampler makes the
    # next batch (Pillow's encoder releases the GIL), so saving does not slow generation down.
    writers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="class-image-writer")
    pending = []
    try:
        start = 0
        while start < total:
            if should_stop is not None and should_stop():
                break
            size = todo[start][1]
            batch = [todo[start]]
            while start + len(batch) < total and len(batch) < batch_size and todo[start + len(batch)][1] == size:
                batch.append(todo[start + len(batch)])
            prompts = [p for p, _ in batch]
            batch_number += 1
            if batch_number % processes != rank:       # another process's batch: same numbers, not made here
                index += len(prompts)
                start += len(prompts)
                continue
            try:
                images = generate_fn(model, prompts, negative_prompt=concept.class_negative_prompt,
                                     steps=concept.class_steps, cfg=concept.class_guidance_scale, seed=index,
                                     width=size[0], height=size[1], batch_size=len(prompts), scheduler=scheduler,
                                     should_stop=should_stop, clip_skip=clip_skip)
            except Exception as e:
                if type(e).__name__ == "SamplingInterrupted":   # should_stop() fired inside the sampler
                    break
                raise
            pils = _tensor_to_pils(images)
            for k, (prompt, pil) in enumerate(zip(prompts, pils)):
                path = os.path.join(concept.class_dir, f"{index + k:05d}-{_slug(prompt)}.png")
                info = (f"Negative prompt: {concept.class_negative_prompt}\nSteps: {concept.class_steps}, "
                        f"Sampler: {scheduler}, CFG scale: {concept.class_guidance_scale}, Seed: {index + k}, "
                        f"Size: {size[0]}x{size[1]}" + (f", Clip skip: {clip_skip}" if clip_skip else ""))
                pending.append(writers.submit(_save_png, pil, path, prompt, info))
                paths.append(path)
            index += len(prompts)
            start += len(prompts)
            done += len(pils)
            if progress:
                progress(done, total if processes == 1 else -(-total // processes))
            if len(pils) < len(prompts):   # generate() stopped early
                break
    finally:
        writers.shutdown(wait=True)
    for future in pending:
        future.result()            # a failed save (disk full, permissions) surfaces here, naming the file
    return paths


def plan_with_numbers(concept: ConceptSettings, data_settings: DataSettings, scan: ConceptScan | None = None):
    """(todo, first file number) of `concept`'s missing class images: what `ensure_class_images(planned=...)`
    takes when several processes share the work (computed by each before any of them writes)."""
    scan = scan or scan_concept(concept)
    todo = plan_class_generation(concept, data_settings, scan)
    index = _next_index(concept.class_dir) if os.path.isdir(concept.class_dir) else 0
    return todo, index


__all__ = ["plan_class_generation", "plan_with_numbers", "ensure_class_images"]
