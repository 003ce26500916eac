"""The toy world's guard (issue 19 point 5): does training teach the toy base a subject, and does prior preservation
keep the class? One subject (the red/blue split circle, which "a {colour} {shape} toy" cannot describe), trained with
the pack's own trainer at dreambench's GUARD_* settings, sampled with its own sampler, read by the evaluator.

Goals (`missed` lists the ones a result misses): subject fidelity >= 0.7 and >= the untrained base's + 0.6 after
LoRA and after a full fine-tune; PRES <= 0.2 with prior preservation, whose run must learn the subject too (fidelity
>= PRIOR_FIDELITY_GOAL); and where the text encoder trains, its
encoding of the instance prompt, as the sampler computes it, moved at least TE_SHIFT_GOAL from the base's (the
UNet's adapter learns the subject from the base's encoding alone, so fidelity cannot show a text encoder whose
training never reaches sampling). tests/test_toyworld_guard.py and
bench/toyworld_guard.py run it.

`sabotage` breaks training the way real bugs did or could, to show the guard catches it:
  lr0            every learning rate at the smallest allowed value (1e-10): nothing is learned;
  no_te_lora     the text encoder's LoRA is created and trained but not applied in its forward (the transformers
                 4.x defect this project once had);
  no_prior_loss  class images are in every batch but their loss weight is 0 (prior preservation dropped).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time

SABOTAGES = ("lr0", "no_te_lora", "no_prior_loss")
ROWS = ("lora", "full", "full_prior")
# with prior preservation the subject must still be learnt, else a low PRES says nothing (at 400 steps the prior run
# learnt it in 0.08-0.33 of samples, and with its prior loss dropped PRES stayed at 0.08: the sabotage went uncaught)
PRIOR_FIDELITY_GOAL = 0.5
GUARD_SUBJECT = "split_circle"
# a job's rough share of the guard's time (steps, and class images to generate), to start the longest first
_COST = {"full_prior": 3, "lora_prior": 2, "full": 1.2, "lora": 1}
TE_SHIFT_GOAL = 0.002        # a fifth of a healthy run's (GUARD_LORA: 0.0104); the no_te_lora defect gives 0.0


@contextlib.contextmanager
def text_encoder_lora_not_applied():
    """add_adapters as usual, then the text encoder's adapter layers skip their adapter in forward."""
    from ..setup import adapters

    real = adapters.add_adapters

    def broken(model, **kw):
        adapted = real(model, **kw)
        for te in adapted.text_encoders:
            for module in te.modules():
                if hasattr(module, "_disable_adapters"):
                    module._disable_adapters = True
        return adapted

    adapters.add_adapters = broken
    try:
        yield
    finally:
        adapters.add_adapters = real


def sabotaged(variant, sabotage: str | None):
    if sabotage == "lr0":
        return dataclasses.replace(variant, learning_rate=1e-10, text_encoder_lr=1e-10)
    if sabotage == "no_prior_loss" and variant.prior != "none":
        return dataclasses.replace(variant, prior_loss_weight=0.0)
    return variant


def text_encoder_shift(base, model, prompt: str) -> float:
    """Relative L2 change of `prompt`'s encoding (the sampler's own encode_prompts) from the base to `model`: 0 when
    the text encoder's training does not reach sampling."""
    import torch

    from ..models.text import encode_prompts

    with torch.no_grad():
        before = encode_prompts(base, [prompt]).embeds
        after = encode_prompts(model, [prompt]).embeds
    return float((after - before).norm() / before.norm())


def run(samples: int = 12, base_file: str | None = None, sabotage: str | None = None,
        rows: tuple = ROWS, workers: int | None = None) -> dict:
    """Train and measure each row; `workers` processes (default: one per CPU core, at most one per job) share the
    jobs, each on one thread, so the result is the same however many there are (a row's run is seeded; nothing
    passes between rows). The jobs are the untrained base's fidelity and one per row, longest first."""
    if sabotage not in (None, *SABOTAGES):
        raise ValueError(f"--sabotage {sabotage!r}: choose one of {', '.join(SABOTAGES)}")
    from .commands import base_path
    from .world import SUBJECTS

    base_file = base_file or base_path()
    jobs = sorted(rows, key=lambda k: -_COST[k]) + ["base"]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    out = {"sabotage": sabotage, "base_fidelity": None}      # filled by the "base" job; the keys' order kept
    with tempfile.TemporaryDirectory(prefix="toyworld-guard-") as root:
        from . import dreambench as db

        db.write_instance_images(SUBJECTS[GUARD_SUBJECT], os.path.join(root, "instance"), 5)
        args = [(key, samples, base_file, sabotage, root) for key in jobs]
        if workers == 1:
            parts = [_job(*a) for a in args]
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: a fresh interpreter per worker (fork would copy a parent's threads and torch state)
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                parts = list(pool.map(_job, *zip(*args)))
    for part in parts:
        out.update(part)
    return out


def _job(key: str, samples: int, base_file: str, sabotage: str | None, root: str) -> dict:
    """One row (or "base": the untrained base's fidelity), in this process on one thread."""
    import torch
    from PIL import Image

    from ..models import load_model
    from . import dreambench as db
    from .world import SUBJECTS

    torch.set_num_threads(1)
    subject = SUBJECTS[GUARD_SUBJECT]
    inst = os.path.join(root, "instance")
    images = [Image.open(os.path.join(inst, name)).convert("RGB") for name in sorted(os.listdir(inst))]
    judge = db.judge_for(subject, images, count=100)
    base = load_model(base_file, dtype="fp32")
    if key == "base":
        return {"base_fidelity": db.subject_fidelity(base, subject, judge, samples)}
    variants = {"lora": db.GUARD_LORA, "full": db.GUARD_FULL, "lora_prior": db.GUARD_LORA_PRIOR,
                "full_prior": db.GUARD_FULL_PRIOR}
    variant = sabotaged(variants[key], sabotage)
    patch = text_encoder_lora_not_applied() if sabotage == "no_te_lora" else contextlib.nullcontext()
    out = {}
    t0 = time.time()
    with patch:
        model = db.train_variant(base, variant, inst, os.path.join(root, key), count=5).model
    out[f"{key}_fidelity"] = db.subject_fidelity(model, subject, judge, samples)
    if variant.text_encoder:
        out[f"{key}_te_shift"] = round(text_encoder_shift(base, model, db.instance_prompt(db.TOKEN)), 5)
    if variant.prior != "none":
        out[f"{key}_pres"] = db.pres(model, judge, samples)
    out[f"{key}_seconds"] = round(time.time() - t0, 1)
    return out


def missed(r: dict) -> list[str]:
    goals = []
    for key in ("lora", "full"):
        if f"{key}_fidelity" not in r:
            continue
        f = r[f"{key}_fidelity"]
        if not (f >= 0.7 and f >= r["base_fidelity"] + 0.6):
            goals.append(f"{key}: subject fidelity {f} (goal >= 0.7 and >= base {r['base_fidelity']} + 0.6)")
    for key in ROWS + ("lora_prior",):
        if f"{key}_te_shift" in r and r[f"{key}_te_shift"] < TE_SHIFT_GOAL:
            goals.append(f"{key}: the text encoder's training moved the instance prompt's encoding by "
                         f"{r[f'{key}_te_shift']} (goal >= {TE_SHIFT_GOAL}): it does not reach sampling")
    for key in ("lora_prior", "full_prior"):
        if f"{key}_pres" in r and r[f"{key}_pres"] > 0.2:
            goals.append(f"{key}: PRES {r[f'{key}_pres']} (goal <= 0.2)")
        if f"{key}_pres" in r and r[f"{key}_fidelity"] < PRIOR_FIDELITY_GOAL:
            goals.append(f"{key}: subject fidelity {r[f'{key}_fidelity']} (goal >= {PRIOR_FIDELITY_GOAL}): a run that "
                         "did not learn the subject keeps the class trivially, so its PRES proves nothing")
    return goals


__all__ = ["SABOTAGES", "ROWS", "TE_SHIFT_GOAL", "PRIOR_FIDELITY_GOAL", "run", "missed", "sabotaged", "text_encoder_lora_not_applied",
           "text_encoder_shift"]
