"""The best checkpoint and early stopping, from the validation records (validation.py).

keep_best's rule (documented in the keep_best tooltip and the README):
  1. the candidates are the saved checkpoints (and the final state) that have a validation record;
  2. with `best_drift_ceiling` > 0, a candidate qualifies when its prior drift is at most that x the base model's
     own subject loss (the validation at step 0, before any training): the class prompt's prediction may move by
     that fraction of the noise-prediction error the base makes on the subject. The default, 0, sets no ceiling:
     in the toy world (README "Toy world", bench/keep_best.py) prior drift did not track the class's drift as the
     evaluator sees it within a run, and a ceiling of 0.25 chose an almost untrained checkpoint (step 51 of 400)
     for a full fine-tune without prior preservation;
  3. the qualifying candidate with the lowest score wins: the subject loss of its low and middle bands
     (SCORE_BANDS: t = 150 and 500; the high band, t = 850, is left out); candidates within the tie of that
     score cannot be told apart by a validation's few fixed noises, and the latest of them (the one trained longest
     on the subject) wins. The tie is measured, not guessed: over 16 noise draws per checkpoint of five toy-world
     runs with 5 validation images, the difference between two checkpoints' scores varies by 5.1 % of the score
     (median; 4-6 % per run) from one draw to the next, so LOSS_TIE = 5 % at TIE_IMAGES = 5 images, and
     5 % x sqrt(5 / n) for n images (a mean over more images varies less). Choosing with that tie came within 0.05
     of the evaluator's best fidelity for 67 of 80 single draws, against 54 with a 1 % tie (mean shortfall 0.028
     against 0.068; bench/keep_best_draws.py). When none qualifies, the candidate with the lowest prior drift wins
     (and the log says so).
The best checkpoint is kept beside keep_last_checkpoints' (never pruned while it is the best), named in
config.json ("best") and in the run's summary.

early_stop = N: the run ends (as finished, with its final state) when the score has not improved on its best for
N validations in a row; the log says so and why.

Why not the high band: its errors are 3-5x the others' and so rule a plain mean, yet they do not follow what the
model draws. In the toy world's five keep_best runs (README "Toy world", bench/keep_best_noise.py) the mean of all
three bands chose checkpoints whose subject fidelity fell short of the evaluator's best by 0.58 (the dotted heart,
800 steps) and 0.17 (prior preservation, 400 steps), a mean gap of 0.15; the low and middle bands 0.05 (misses of
0.17 and 0.08). Scored with each of 16 other single draws per checkpoint (1 % tie), the choice came within 0.05 of
the best in 54 of 80 (run, draw) cases, against 39 for all three bands (67 with the measured 5 % tie).
"""
from __future__ import annotations

import math
import os
import shutil

from .validation import is_due, validate


LOSS_TIE = 0.05        # relative, at TIE_IMAGES validation images: one draw-to-draw spread of a score difference
TIE_IMAGES = 5
SCORE_BANDS = ("low", "mid")


def tie(record: dict) -> float:
    """The relative score difference below which two validations cannot be told apart: LOSS_TIE scaled by
    sqrt(TIE_IMAGES / images) for the record's number of validation images (LOSS_TIE when it does not say)."""
    images = record.get("images")
    return LOSS_TIE * math.sqrt(TIE_IMAGES / images) if images else LOSS_TIE


def score(record: dict) -> float:
    """The subject loss keep_best and early_stop compare: the mean of SCORE_BANDS' losses (a record without them,
    from an older run, scores by its mean over every band)."""
    losses = [record.get(f"loss_{band}") for band in SCORE_BANDS]
    return sum(losses) / len(losses) if None not in losses else record["loss"]


def choose_best(records: list[dict], ceiling: float) -> tuple[dict | None, str]:
    """(the best record, why) among `records` that name a checkpoint; the step-0 record is the baseline."""
    base = next((r for r in records if r.get("step") == 0), None)
    candidates = [r for r in records if r.get("checkpoint")]
    if not candidates:
        return None, "no checkpoint has been validated yet"
    if not ceiling or ceiling <= 0:
        limit, what = float("inf"), "no drift ceiling (best_drift_ceiling 0)"
    elif base is None:
        limit, what = float("inf"), "no baseline (step 0) validation: no drift ceiling"
    else:
        limit = ceiling * base["loss"]
        what = f"prior drift <= {ceiling:g} x base loss {base['loss']:.4g} = {limit:.4g}"
    under = [r for r in candidates if r["prior_drift"] <= limit]
    if under:
        lowest = min(under, key=score)
        within = tie(lowest)
        tied = [r for r in under if score(r) <= score(lowest) * (1 + within)]
        best = max(tied, key=lambda r: r["step"])
        tied_note = (f"; the latest of {len(tied)} within {within:.1%} of the lowest ({score(lowest):.4g})"
                     if len(tied) > 1 else "")
        return best, (f"lowest subject loss at the low and middle bands ({score(best):.4g}{tied_note}) among "
                      f"{len(under)} checkpoint(s) with {what}")
    best = min(candidates, key=lambda r: (r["prior_drift"], r["step"]))
    return best, (f"no checkpoint has {what}: the one with the lowest prior drift ({best['prior_drift']:.4g}) "
                  "instead")


def stale_validations(records: list[dict]) -> int:
    """How many validations in a row (the latest ones) have not improved on the lowest score before them."""
    best, since = float("inf"), 0
    for r in records:
        if (value := score(r)) < best:
            best, since = value, 0
        else:
            since += 1
    return since


def validation_step(job, step: int, saved: str | None) -> bool:
    """At a step where validation is due: validate (main process), update the best checkpoint, and decide early
    stopping together with every process. Returns True when the run must stop early."""
    settings = job.settings
    if not is_due(settings, step, saved, job.total_steps) and step != 0:
        return False
    stop = False
    if job.main:
        record = validate(job, step, checkpoint=saved, with_grid=bool(saved) or step == job.total_steps)
        if settings.keep_best and saved:
            update_best(job)
        records = job.validation.records
        n = settings.early_stop
        if n and step and stale_validations(records) >= n:
            best = min(records, key=score)
            job.say(f"early stop at step {step}: the subject loss at the low and middle bands ({score(record):.4g}) "
                    f"has not improved for {n} validations (best {score(best):.4g} at step {best['step']}; "
                    f"early_stop = {n})")
            stop = True
    return bool(job.dist.sum([float(stop)], job.device)[0]) if job.dist.active else stop


def update_best(job) -> None:
    """Choose the best among the validated checkpoints that still exist; the one it replaces is pruned when
    keep_last_checkpoints would have pruned it already."""
    val = job.validation
    records = [r for r in val.records if r.get("step") == 0 or _exists(r.get("checkpoint"))]
    best, why = choose_best(records, job.settings.best_drift_ceiling)
    if best is None:
        return
    old = val.best
    val.best = {"step": best["step"], "checkpoint": best["checkpoint"], "loss": best["loss"], "score": score(best),
                "prior_drift": best["prior_drift"], "rule": why}
    if old and old["checkpoint"] != best["checkpoint"]:
        _prune_if_old(job, old["checkpoint"])
    if not old or old["checkpoint"] != best["checkpoint"]:
        job.say(f"best checkpoint: step {best['step']} ({why})")
    job.run.update_config(best=val.best)


def protected(job) -> tuple:
    """Checkpoints keep_last_checkpoints must not prune: the best one."""
    best = getattr(job.validation, "best", None)
    return (best["checkpoint"],) if best else ()


def _exists(path) -> bool:
    return bool(path) and os.path.isdir(path)


def _prune_if_old(job, path: str) -> None:
    keep_last = job.settings.keep_last_checkpoints
    checkpoints = job.run.checkpoints()
    if keep_last > 0 and path in checkpoints and path not in checkpoints[-keep_last:]:
        shutil.rmtree(path, ignore_errors=True)


def conclude(job, final_step: int, final_path: str | None) -> dict | None:
    """At the end of a run: the final state is a candidate too (its validation was made at `final_step`); the best
    is chosen once more and named in config.json. Returns it (None without keep_best)."""
    val = job.validation
    if val is None or not job.main or not job.settings.keep_best:
        return None
    for r in val.records:
        if r["step"] == final_step and final_path:
            r["checkpoint"] = final_path
    update_best(job)
    if val.best:
        job.say(f"best checkpoint of the run: step {val.best['step']}, {val.best['checkpoint']} "
                f"(subject loss {val.best['loss']:.4g}, at the low and middle bands {val.best['score']:.4g}, prior "
                f"drift {val.best['prior_drift']:.4g})")
    return val.best


# ---- the best checkpoint as a model (SaveLoRA / SaveCheckpoint `which = best`) ---------------------------------
def best_model(model):
    """`model` (a finished run's result) with the weights of its run's best checkpoint: copies of the trained modules
    (the model itself is not changed), its EMA from that checkpoint when it has one."""
    import torch
    from safetensors.torch import load_file

    from .setup.trainable import trainable_copy

    best = model.metadata.get("best_checkpoint")
    if not best:
        raise ValueError("which = best: this model has no best checkpoint; train it with keep_best on (and "
                         "validate_every_steps set), or use which = last")
    folder = best["checkpoint"]
    if not os.path.exists(os.path.join(folder, "trainable.safetensors")):
        raise FileNotFoundError(f"which = best: the best checkpoint {folder} is gone (moved or deleted); use which = "
                                "last, or LoadTrained on another checkpoint of the run")
    saved = load_file(os.path.join(folder, "trainable.safetensors"))
    parts = {"unet": model.unet, **{f"te{i}": te for i, te in enumerate(model.text_encoders)}}
    copies = {part: trainable_copy(m) for part, m in parts.items() if any(k.startswith(part + ".") for k in saved)}
    named = {f"{part}.{n}": p for part, m in copies.items() for n, p in m.named_parameters()}
    missing = sorted(set(saved) - set(named))
    if missing:
        raise ValueError(f"which = best: {folder} has weights this model lacks (e.g. {missing[:2]}); it belongs to "
                         "another run")
    with torch.no_grad():
        for key, tensor in saved.items():
            named[key].copy_(tensor.to(device=named[key].device, dtype=named[key].dtype))
    changes = {"metadata": {**model.metadata, "chosen_checkpoint": folder}}
    if "unet" in copies:
        changes["unet"] = copies["unet"]
        changes["ema_unet"] = _ema_of(folder, copies["unet"]) if model.ema_unet is not None else None
    tes = [copies.get(f"te{i}", te) for i, te in enumerate(model.text_encoders)]
    return model.replace(text_encoders=tes, **changes)


def _ema_of(folder: str, unet):
    """The checkpoint's EMA weights on a copy of `unet` (None when it has none)."""
    import copy

    import torch

    path = os.path.join(folder, "ema.pt")
    if not os.path.exists(path):
        return None
    shadow = torch.load(path, map_location="cpu", weights_only=True)["shadow"]
    ema_unet = copy.deepcopy(unet)
    params = dict(ema_unet.named_parameters())
    with torch.no_grad():
        for name, value in shadow.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
    return ema_unet


__all__ = ["LOSS_TIE", "TIE_IMAGES", "SCORE_BANDS", "score", "tie", "best_model", "choose_best", "stale_validations", "validation_step", "update_best", "protected", "conclude"]
