"""Is keep_best's miss with prior preservation a matter of too few noise draws? (issue 20 point 2)

    python bench/keep_best.py --rows "full + prior preservation" --steps 400 --samples 24 --work-dir W
    python bench/keep_best_noise.py W [--noises 16] [--samples 64] [--subject NAME] [--guided]

For every checkpoint of the runs that bench/keep_best.py kept in W: the subject loss on the instance images (as
validation.measure computes it: the latent mean, the instance prompt, the training target) at 11 timesteps with
`--noises` fixed noise draws each, and the evaluator's subject fidelity and PRES at `--samples` samples. Printed per
scoring (the run's own record: 3 bands x 1 draw; 3 bands x N draws; all 11 timesteps; low and middle bands only;
high noise only): the checkpoint it would choose and its Spearman rho with fidelity. Out: W/keep_best_noise.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

TIMESTEPS = (50, 150, 250, 350, 450, 500, 550, 650, 750, 850, 950)
BANDS = (150, 500, 850)          # validation.TIMESTEP_BANDS


def losses(model, latents, prompt: str, noise, scheduler, guidance: float | None = None):
    """(timesteps, noises) mean subject loss of `model` on `latents`; with `guidance`, of the prediction the sampler
    steps by at that classifier-free guidance (the empty prompt's prediction pushed towards `prompt`'s)."""
    import torch

    from comfyui_dreambooth.training.models.text import encode_prompts
    from comfyui_dreambooth.training.setup.noise import per_sample_mse, training_target

    out = torch.zeros(noise.shape[:2], dtype=torch.float64)
    with torch.no_grad():
        embeds = encode_prompts(model, [prompt] * len(latents)).embeds
        empty = encode_prompts(model, [""] * len(latents)).embeds if guidance is not None else None
        for i, t in enumerate(TIMESTEPS):
            ts = torch.full((len(latents),), t, dtype=torch.long)
            for k in range(noise.shape[1]):
                n = noise[i, k]
                noisy = scheduler.add_noise(latents, n, ts)
                pred = model.unet(noisy, ts, embeds).sample
                if empty is not None:
                    unconditional = model.unet(noisy, ts, empty).sample
                    pred = unconditional + guidance * (pred - unconditional)
                out[i, k] = per_sample_mse(pred, training_target(scheduler, latents, n, ts, model.prediction_type)
                                           ).mean()
    return out


def scorings(points: list[dict]) -> dict:
    import numpy as np

    at = {t: i for i, t in enumerate(TIMESTEPS)}

    def mean_of(ts, draws=None, key="loss"):
        return [float(np.asarray(p[key])[[at[t] for t in ts], :draws].mean()) for p in points]

    return {"the run's record (3 bands x 1 draw)": [p["record_loss"] for p in points],
            "3 bands x all draws": mean_of(BANDS),
            "all 11 timesteps": mean_of(TIMESTEPS),
            "low and middle bands (150, 500)": mean_of(BANDS[:2]),
            "high noise (850, 950)": mean_of((850, 950)),
            **({} if "guided_loss" not in points[0] else {
                "guided (CFG as sampled), 3 bands x all draws": mean_of(BANDS, key="guided_loss"),
                "guided (CFG as sampled), all 11 timesteps": mean_of(TIMESTEPS, key="guided_loss")})}


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from comfyui_dreambooth.training.fsutil import read_jsonl
    from comfyui_dreambooth.training.models import load_model
    from comfyui_dreambooth.training.reload import load_trained
    from comfyui_dreambooth.training.settings import DreamBoothSettings
    from comfyui_dreambooth.training.setup.noise import build_noise_scheduler
    from comfyui_dreambooth.training.toyworld import dreambench as db
    from comfyui_dreambooth.training.toyworld.commands import base_path
    from comfyui_dreambooth.training.toyworld.world import SUBJECTS

    from keep_best import spearman

    p = argparse.ArgumentParser(description="keep_best's subject loss at more noise draws and timesteps")
    p.add_argument("work_dir")
    p.add_argument("--subject", default="split_circle")
    p.add_argument("--noises", type=int, default=16)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--guided", action="store_true",
                   help="also score by the loss of the guided prediction (at the sampler's CFG, dreambench.SAMPLE_CFG)")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    subject = SUBJECTS[a.subject]
    base = load_model(base_path(), dtype="fp32")
    images = [Image.open(f).convert("RGB") for f in sorted(glob.glob(os.path.join(a.work_dir, a.subject,
                                                                                   "instance", "*.png")))]
    judge = db.judge_for(subject, images)
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1)
    with torch.no_grad():
        latents = base.vae.encode(x.permute(0, 3, 1, 2)).latent_dist.mean * base.vae.config.scaling_factor
    scheduler = build_noise_scheduler(DreamBoothSettings(), base.prediction_type)
    noise = torch.randn((len(TIMESTEPS), a.noises, *latents.shape), generator=torch.Generator().manual_seed(123))
    runs = []
    for run_dir in sorted(glob.glob(os.path.join(a.work_dir, a.subject, "runs", "dreambooth", "*", ""))):
        records = {r["step"]: r for r in read_jsonl(os.path.join(run_dir, "validation.jsonl"))}
        points = []
        for ck in sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step-*"))) + [os.path.join(run_dir, "final")]:
            if not os.path.isdir(ck):
                continue
            model = load_trained(base, ck)
            step = int(ck.rsplit("-", 1)[1]) if "step-" in ck else max(records)
            points.append({"checkpoint": os.path.basename(ck), "step": step,
                           "record_loss": records.get(step, {}).get("loss"),
                           "loss": losses(model, latents, db.instance_prompt(db.TOKEN), noise, scheduler).tolist(),
                           **({"guided_loss": losses(model, latents, db.instance_prompt(db.TOKEN), noise, scheduler,
                                                     db.SAMPLE_CFG).tolist()} if a.guided else {}),
                           "subject_fidelity": db.subject_fidelity(model, subject, judge, a.samples),
                           "pres": db.pres(model, judge, a.samples)})
            print(points[-1]["checkpoint"], "fidelity", points[-1]["subject_fidelity"], "PRES", points[-1]["pres"],
                  flush=True)
        fidelity = [p["subject_fidelity"] for p in points]
        table = {}
        for name, scores in scorings(points).items():
            pick = min(range(len(points)), key=lambda i: scores[i])
            table[name] = {"chooses": points[pick]["step"], "its_fidelity": fidelity[pick],
                           "rho_with_fidelity": spearman(scores, fidelity), "scores": [round(s, 4) for s in scores]}
            print(f"{name}: chooses step {points[pick]['step']} (fidelity {fidelity[pick]}), rho "
                  f"{table[name]['rho_with_fidelity']}")
        runs.append({"run": os.path.basename(os.path.dirname(run_dir)), "points": points, "scorings": table})
    with open(os.path.join(a.work_dir, "keep_best_noise.json"), "w", encoding="utf-8") as f:
        json.dump({"timesteps": TIMESTEPS, "noises": a.noises, "samples": a.samples, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
