"""The toy world's guard check (issue 19 point 5), runnable on its own: does training teach the toy base a subject?

    python bench/toyworld_guard.py [--samples 12] [--base FILE]

One subject (the red/blue split circle, which "a {colour} {shape} toy" cannot describe), trained with the pack's
own trainer at the guard settings (dreambench.GUARD_LORA / GUARD_FULL / GUARD_LORA_PRIOR / GUARD_FULL_PRIOR), sampled with its own
sampler, read by the evaluator. Prints the untrained base's subject fidelity, each run's fidelity and the prior
run's PRES, and exits 1 when a goal is missed: fidelity >= 0.7 and >= the base's + 0.6 after LoRA and after a full
fine-tune, PRES <= 0.2 with prior preservation. It becomes tests/test_toyworld_guard.py once the shipped base passes
it (README "Toy world" gives the current numbers).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def run(samples: int = 12, base_file: str | None = None) -> dict:
    import torch

    from comfyui_dreambooth.training.models import load_model
    from comfyui_dreambooth.training.toyworld import dreambench as db
    from comfyui_dreambooth.training.toyworld.commands import base_path
    from comfyui_dreambooth.training.toyworld.world import SUBJECTS

    torch.set_num_threads(1)
    subject = SUBJECTS["split_circle"]
    base = load_model(base_file or base_path(), dtype="fp32")
    out = {}
    with tempfile.TemporaryDirectory(prefix="toyworld-guard-") as root:
        inst = os.path.join(root, "instance")
        judge = db.judge_for(subject, db.write_instance_images(subject, inst, 5), count=100)
        out["base_fidelity"] = db.subject_fidelity(base, subject, judge, samples)
        for key, variant in (("lora", db.GUARD_LORA), ("full", db.GUARD_FULL), ("lora_prior", db.GUARD_LORA_PRIOR),
                             ("full_prior", db.GUARD_FULL_PRIOR)):
            t0 = time.time()
            model = db.train_variant(base, variant, inst, os.path.join(root, key), count=5).model
            out[f"{key}_fidelity"] = db.subject_fidelity(model, subject, judge, samples)
            if variant.prior != "none":
                out[f"{key}_pres"] = db.pres(model, judge, samples)
            out[f"{key}_seconds"] = round(time.time() - t0, 1)
    return out


def missed(r: dict) -> list[str]:
    goals = []
    for key in ("lora", "full"):
        f = r[f"{key}_fidelity"]
        if not (f >= 0.7 and f >= r["base_fidelity"] + 0.6):
            goals.append(f"{key}: subject fidelity {f} (goal >= 0.7 and >= base {r['base_fidelity']} + 0.6)")
    for key in ("lora_prior", "full_prior"):
        if r[f"{key}_pres"] > 0.2:
            goals.append(f"{key}: PRES {r[f'{key}_pres']} (goal <= 0.2)")
    return goals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the toy world's guard check")
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--base", default=None, help="a toy base file (default: the shipped one)")
    a = p.parse_args(argv)
    result = run(a.samples, a.base)
    print(json.dumps(result, indent=1))
    problems = missed(result)
    for line in problems:
        print("MISSED " + line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
