"""Does keep_best choose the checkpoint the evaluator would choose? (issue 20 point 2, in the toy world)

    python bench/keep_best.py [--subjects split_circle] [--rows "full fine-tune" ...] [--samples 16]

For each row of bench/quality.py (dreambench.VARIANTS) and subject: train with validation on, a resumable checkpoint
about every 50 steps (all kept) and keep_best; then read every checkpoint back (training.reload.load_trained) and
measure it with the toy world's evaluator: subject fidelity ("a sks toy") and PRES ("a toy", lower is better).
Reported per run: the checkpoint keep_best chose, the one the evaluator ranks first (highest fidelity, then lowest
PRES, then earliest), their fidelity gap (goal: <= 0.05) and PRES (goal: chosen no worse); and over all checkpoints
Spearman's rank correlation of keep_best's score (the subject loss at the low and middle bands, best.score) with
fidelity (should be negative) and of prior drift with
PRES (should be positive). Out: bench/results/keep_best.json and keep_best.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT_EVERY_STEPS = 50


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rho (scipy; average ranks for ties); None when either side is constant or shorter than 3."""
    from scipy.stats import spearmanr

    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return round(float(spearmanr(xs, ys).statistic), 3)


def evaluator_best(points: list[dict]) -> dict:
    return min(points, key=lambda p: (-p["subject_fidelity"], p["pres"], p["step"]))


def with_validation(variant, steps_per_epoch: int):
    """The variant with validation every CHECKPOINT_EVERY_STEPS steps, a checkpoint at each, all kept, keep_best."""
    every_epochs = max(1, round(CHECKPOINT_EVERY_STEPS / steps_per_epoch))
    extra = dict(variant.extra, validate_every_steps=every_epochs * steps_per_epoch, keep_best=True,
                 save_every_epochs=every_epochs, keep_last_checkpoints=0)
    return dataclasses.replace(variant, extra=extra)


def steps_per_epoch(variant, instances: int) -> int:
    """The trainer's epoch length for dreambench's concepts (5 instance images, batch 2): one pass over the instance
    images; with class images each instance image brings one prior example along (dataset report: "Examples per
    epoch: 10" for 5 images)."""
    items = instances * (2 if variant.prior == "class_images" else 1)
    return math.ceil(items / variant.batch_size)


def checkpoint_records(run_dir: str, records: list[dict]) -> list[dict]:
    """The validation records that name a checkpoint; the last record (the final state, which keep_best also
    considers) gets the run's final/ folder."""
    out = [dict(r) for r in records if r.get("checkpoint") and os.path.isdir(r["checkpoint"])]
    final = os.path.join(run_dir, "final")
    last = max(records, key=lambda r: r["step"]) if records else None
    if last and not last.get("checkpoint") and os.path.isdir(final):
        out.append(dict(last, checkpoint=final))
    return out


def run(subjects: list[str], rows: list[str] | None, samples: int, instances: int, steps: int | None = None,
        work_dir: str | None = None) -> dict:
    import torch

    from comfyui_dreambooth.training.best import score
    from comfyui_dreambooth.training.fsutil import read_jsonl
    from comfyui_dreambooth.training.models import load_model
    from comfyui_dreambooth.training.reload import load_trained
    from comfyui_dreambooth.training.toyworld import dreambench as db
    from comfyui_dreambooth.training.toyworld.commands import base_path
    from comfyui_dreambooth.training.toyworld.world import SUBJECTS

    torch.set_num_threads(1)
    base = load_model(base_path(), dtype="fp32")
    variants = [v for v in db.VARIANTS if rows is None or v.name in rows]
    if steps:
        variants = [dataclasses.replace(v, steps=steps) for v in variants]
    runs, started = [], time.time()
    with (contextlib.nullcontext(work_dir) if work_dir else tempfile.TemporaryDirectory(prefix="keepbest-")) as work:
        for name in subjects:
            subject = SUBJECTS[name]
            inst_dir = os.path.join(work, name, "instance")
            judge = db.judge_for(subject, db.write_instance_images(subject, inst_dir, instances))
            for plain in variants:
                variant = with_validation(plain, steps_per_epoch(plain, instances))
                t0 = time.time()
                result = db.train_variant(base, variant, inst_dir, os.path.join(work, name), count=instances,
                                          subject=subject)
                records = read_jsonl(os.path.join(result.run_dir, "validation.jsonl"))
                with open(os.path.join(result.run_dir, "config.json"), encoding="utf-8") as f:
                    chosen = (json.load(f).get("best") or {}).get("checkpoint")
                points = []
                for r in checkpoint_records(result.run_dir, records):
                    model = load_trained(base, r["checkpoint"])
                    points.append({"step": r["step"], "checkpoint": os.path.basename(r["checkpoint"]),
                                   "loss": score(r), "loss_all_bands": r["loss"], "prior_drift": r["prior_drift"],
                                   "subject_fidelity": db.subject_fidelity(model, subject, judge, samples),
                                   "pres": db.pres(model, judge, samples)})
                pick = next((p for p in points if chosen and p["checkpoint"] == os.path.basename(chosen)), None)
                top = evaluator_best(points) if points else None
                entry = {"subject": name, "row": plain.name, "points": points, "train_s": round(time.time() - t0, 1),
                         "chosen": pick, "evaluator_best": top,
                         "rho_loss_fidelity": spearman([p["loss"] for p in points],
                                                       [p["subject_fidelity"] for p in points]),
                         "rho_drift_pres": spearman([p["prior_drift"] for p in points], [p["pres"] for p in points])}
                if pick and top:
                    entry["fidelity_gap"] = round(top["subject_fidelity"] - pick["subject_fidelity"], 4)
                    entry["pres_worse_by"] = round(pick["pres"] - top["pres"], 4)
                    entry["met"] = entry["fidelity_gap"] <= 0.05 and entry["pres_worse_by"] <= 0
                runs.append(entry)
                print(f"[keep_best] {name} / {plain.name}: chosen step {pick and pick['step']} "
                      f"(fidelity {pick and pick['subject_fidelity']}, PRES {pick and pick['pres']}); evaluator's "
                      f"best step {top and top['step']} (fidelity {top and top['subject_fidelity']}, PRES "
                      f"{top and top['pres']}); rho(loss, fidelity) {entry['rho_loss_fidelity']}, rho(drift, PRES) "
                      f"{entry['rho_drift_pres']}", flush=True)
    every = [p for r in runs for p in r["points"]]
    return {"runs": runs, "samples": samples, "seconds": round(time.time() - started, 1),
            "pooled": {"rho_loss_fidelity": spearman([p["loss"] for p in every],
                                                     [p["subject_fidelity"] for p in every]),
                       "rho_drift_pres": spearman([p["prior_drift"] for p in every], [p["pres"] for p in every]),
                       "checkpoints": len(every)}}


def markdown(results: dict) -> str:
    lines = [f"{results['samples']} samples per figure; {results['seconds']} s", "",
             "| subject / row | chosen step: fidelity, PRES | evaluator's best step: fidelity, PRES | fidelity gap "
             "(<= 0.05) | PRES worse by (<= 0) | rho(score, fidelity) | rho(drift, PRES) |",
             "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        c, t = r["chosen"] or {}, r["evaluator_best"] or {}
        lines.append(f"| {r['subject']} / {r['row']} | {c.get('step')}: {c.get('subject_fidelity')}, {c.get('pres')} "
                     f"| {t.get('step')}: {t.get('subject_fidelity')}, {t.get('pres')} | {r.get('fidelity_gap')} | "
                     f"{r.get('pres_worse_by')} | {r['rho_loss_fidelity']} | {r['rho_drift_pres']} |")
    p = results["pooled"]
    lines += ["", f"pooled over {p['checkpoints']} checkpoints: rho(keep_best score, subject fidelity) "
              f"{p['rho_loss_fidelity']}, rho(prior drift, PRES) {p['rho_drift_pres']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="keep_best against the toy world's evaluator")
    p.add_argument("--subjects", nargs="*", default=["split_circle"])
    p.add_argument("--rows", nargs="*", default=None, help="dreambench.VARIANTS names (default: all)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--instances", type=int, default=5)
    p.add_argument("--steps", type=int, default=None, help="override every row's steps (a smoke run)")
    p.add_argument("--work-dir", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    results = run(a.subjects, a.rows, a.samples, a.instances, a.steps, a.work_dir)
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "keep_best.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    text = markdown(results)
    with open(os.path.join(a.out_dir, "keep_best.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0 if all(r.get("met") for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
