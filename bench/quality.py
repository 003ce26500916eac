"""DreamBench in miniature (issue 19): does training teach the toy base a subject, and what does it forget?

    python bench/quality.py                        # every row, every subject (the README table)
    python bench/quality.py --subjects split_circle --rows LoRA "LoRA + prior preservation" --per-prompt 8
    python bench/quality.py --quick                # one subject, three rows, few samples (a smoke run)
    python bench/quality.py --subjects split_circle --rows --masked   # only the masked-loss pair of rows

Rows: the untrained base, then each dreambench.VARIANTS entry (LoRA, LoRA + prior preservation, full fine-tune,
full + prior preservation, base_model prior, text encoder frozen, and the full fine-tune trained 800 steps and
measured on the checkpoint keep_best chooses: `--rows "full fine-tune" "full fine-tune, keep_best of 800 steps"
--stem keep_best_quality` writes that comparison to its own files), then the instance images themselves (the upper
bound) and after the base's VAE round trip (the codec's bound: what a perfectly trained UNet could show).
`--masked` adds a pair of rows (issue 20 point 3): the full fine-tune (text encoder frozen; `--masked-train-te`:
trained too), on instance images that all show one background, without and with masked loss (masks from the toy
world's renderer, OneTrainer's `-masklabel.png` layout), each the mean of three seeds; their prompt fidelity is
measured on the *other* backgrounds only. With `--rows` and no names, only that pair runs and the files are
masked.*. Columns: subject fidelity and similarity (the DINO / CLIP-I analogue), prompt fidelity (CLIP-T analogue),
recontextualised subject share, PRES (lower is better) and DIV (with its ratio to the base's), averaged over the
subjects. Everything runs on the CPU with the pack's own trainer (training.trainer.train) and sampler
(training.sampling.generate); the evaluator (training/toyworld/evaluate.py) is an analysis calibrated on renders
only. Out: bench/results/quality.json, quality.md and quality-grid.png (rows: models; columns: "a sks toy", one
recontextualised prompt, "a toy").
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

COLUMNS = ["subject_fidelity", "subject_similarity", "prompt_fidelity", "recontext_subject", "pres", "div"]


def run(subjects: list[str], rows: list[str] | None, per_prompt: int, instances: int, out_dir: str,
        steps: int | None = None, threads: int = 1, masked: bool = False, masked_te: bool = False) -> dict:
    import torch

    from comfyui_dreambooth.training.models import load_model
    from comfyui_dreambooth.training.toyworld import dreambench as db
    from comfyui_dreambooth.training.toyworld.commands import base_path
    from comfyui_dreambooth.training.toyworld.world import SUBJECTS

    torch.set_num_threads(threads)
    base = load_model(base_path(), dtype="fp32")
    variants = [v for v in db.VARIANTS if rows is None or v.name in rows]
    if steps:
        variants = [dataclasses.replace(v, steps=steps) for v in variants]
    results = {"rows": {}, "settings": {v.name: db.variant_dict(v) for v in variants}, "grid": []}
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="dreambench-") as work:
        for name in subjects:
            subject = SUBJECTS[name]
            inst_dir = os.path.join(work, name, "instance")
            images = db.write_instance_images(subject, inst_dir, instances)
            judge = db.judge_for(subject, images)
            per = {"base (untrained)": db.measure(base, subject, judge, per_prompt=per_prompt, keep_images=True)}
            for v in variants:
                t0 = time.time()
                result = db.train_variant(base, v, inst_dir, os.path.join(work, name), count=instances,
                                          subject=subject)
                per[v.name] = db.measure(db.trained_model(base, v, result), subject, judge, per_prompt=per_prompt,
                                         keep_images=True)
                if v.extra.get("keep_best"):
                    per[v.name]["best_step"] = (result.info.get("best") or {}).get("step")
                per[v.name]["train_s"] = round(time.time() - t0, 1)
                print(f"[quality] {name} / {v.name}: " + ", ".join(f"{k} {per[v.name][k]}" for k in COLUMNS),
                      flush=True)
            if masked:
                per.update(masked_rows(base, subject, judge, os.path.join(work, name), per_prompt, instances, steps,
                                       train_text_encoder=masked_te))
            per["instance images (upper bound)"] = db.measure_instances(subject, judge)
            per["instance images through the base's VAE"] = db.measure_instances(subject, judge, through=base)
            for row, numbers in per.items():
                pictures = numbers.pop("images", None)
                results["rows"].setdefault(row, {})[name] = numbers
                if pictures and name == subjects[0]:
                    results["grid"].append((row, pictures))
    results["seconds"] = round(time.time() - start, 1)
    return results


MASKED_ROWS = ("full, one background", "full, one background + masked loss")
MASKED_SEEDS = (0, 1, 2)


def masked_rows(base, subject, judge, work: str, per_prompt: int, instances: int, steps: int | None,
                seeds=MASKED_SEEDS, train_text_encoder: bool = False) -> dict:
    """The masked-loss pair: every instance image on the subject's first allowed background, trained without and
    with masked loss (the mask file is there for both; only the setting differs), each over `seeds` (the numbers
    are their means; `per_seed` keeps each seed's prompt fidelity); recontextualised prompts ask for the other
    backgrounds. The UNet trains, the text encoder stays frozen (dreambench.FULL): with the text encoder trained too
    (FULL_TE, `train_text_encoder`) the background words themselves move, and at CFG 4 the instance background
    leaked into nearly every recontextualised sample with or without masks (prompt fidelity 0.06 / 0.10)."""
    from comfyui_dreambooth.training.toyworld import dreambench as db
    from comfyui_dreambooth.training.toyworld.masked import write_masked_subject

    backgrounds = subject.allowed_backgrounds()
    one, others = backgrounds[0], backgrounds[1:]
    folder = os.path.join(work, "one_background")
    write_masked_subject(folder, subject, instances, backgrounds=[one])
    out = {}
    trained = db.FULL_TE if train_text_encoder else db.FULL
    for label, on in zip(MASKED_ROWS, (False, True)):
        label = label.replace("full,", "full + text encoder,") if train_text_encoder else label
        variant = dataclasses.replace(trained, name=label, extra=dict(trained.extra, masked_loss=on),
                                      **({"steps": steps} if steps else {}))
        t0 = time.time()
        runs = []
        for seed in seeds:
            result = db.train_variant(base, variant, folder, os.path.join(work, f"masked{int(on)}-{seed}"),
                                      count=instances, seed=seed)
            runs.append(db.measure(result.model, subject, judge, per_prompt=per_prompt, backgrounds=others,
                                   keep_images=seed == seeds[0]))
        row = {c: round(sum(r[c] for r in runs) / len(runs), 4) for c in COLUMNS}
        row["images"] = runs[0].get("images")
        row["per_seed"] = {c: [r[c] for r in runs] for c in ("subject_fidelity", "prompt_fidelity")}
        row["seeds"] = list(seeds)
        row["train_s"] = round(time.time() - t0, 1)
        row["instance_background"] = one
        out[label] = row
        print(f"[quality] {subject.name} / {label}: " + ", ".join(f"{k} {row[k]}" for k in COLUMNS)
              + f"; per seed {row['per_seed']}", flush=True)
    return out


def summarise(results: dict) -> dict:
    table = {}
    for row, per_subject in results["rows"].items():
        cols = {}
        for c in COLUMNS:
            values = [v[c] for v in per_subject.values() if c in v]
            if values:
                cols[c] = round(sum(values) / len(values), 3)
        table[row] = cols
    base_div = table.get("base (untrained)", {}).get("div")
    for cols in table.values():
        if base_div and "div" in cols:
            cols["div_vs_base"] = round(cols["div"] / base_div, 3)
    return table


def markdown(table: dict, results: dict, subjects: list[str], per_prompt: int) -> str:
    cols = COLUMNS + ["div_vs_base"]
    lines = [f"subjects: {', '.join(subjects)}; {per_prompt} samples per prompt; {results['seconds']} s on "
             f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)", "",
             "| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row, values in table.items():
        lines.append(f"| {row} | " + " | ".join(str(values.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def save_grid(grid: list, path: str) -> None:
    from PIL import Image, ImageDraw

    cell, label = 64, 220
    picks = []
    for row, pictures in grid:
        picks.append((row, pictures["own"][:4] + pictures["recontext"][:2] + pictures["prior"][:4]))
    width = label + cell * max(len(p) for _, p in picks)
    sheet = Image.new("RGB", (width, cell * len(picks)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (row, pictures) in enumerate(picks):
        draw.text((4, r * cell + 26), row, fill=(0, 0, 0))
        for c, im in enumerate(pictures):
            sheet.paste(im, (label + c * cell, r * cell))
    sheet.save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="DreamBench in miniature on the toy base")
    p.add_argument("--subjects", nargs="*", default=None)
    p.add_argument("--rows", nargs="*", default=None, help="variant names (dreambench.VARIANTS); default all")
    p.add_argument("--per-prompt", type=int, default=16)
    p.add_argument("--instances", type=int, default=5)
    p.add_argument("--steps", type=int, default=None, help="override every variant's steps")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--masked", action="store_true", help="add the masked-loss pair of rows (one background)")
    p.add_argument("--masked-train-te", action="store_true", help="the masked pair with the text encoder trained")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--stem", default=None, help="output file names (default: quality, or masked for the masked "
                   "pair alone)")
    a = p.parse_args(argv)
    from comfyui_dreambooth.training.toyworld.world import SUBJECTS

    subjects = a.subjects or (["split_circle"] if a.quick else list(SUBJECTS))
    rows = a.rows if a.rows is not None else (["LoRA", "LoRA + prior preservation", "full fine-tune"] if a.quick else None)
    per_prompt = 6 if a.quick and a.per_prompt == 16 else a.per_prompt
    results = run(subjects, rows, per_prompt, a.instances, a.out_dir, a.steps, masked=a.masked,
                  masked_te=a.masked_train_te)
    table = summarise(results)
    os.makedirs(a.out_dir, exist_ok=True)
    grid = results.pop("grid")
    stem = a.stem or ("masked" if a.masked and rows == [] else "quality")     # the masked pair alone: its own files
    with open(os.path.join(a.out_dir, f"{stem}.json"), "w", encoding="utf-8") as f:
        json.dump({"table": table, **results, "subjects": subjects, "per_prompt": per_prompt}, f, indent=1)
    text = markdown(table, results, subjects, per_prompt)
    with open(os.path.join(a.out_dir, f"{stem}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    save_grid(grid, os.path.join(a.out_dir, f"{stem}-grid.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
