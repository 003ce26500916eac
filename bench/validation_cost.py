"""What validation (issue 20) adds to a run's time: the same run with validation off and on.

    python bench/validation_cost.py                                   # tiny model, CPU, seconds
    python bench/validation_cost.py --model sd15 --device cuda --resolution 512 --steps 200 --every 100

Each run trains `--steps` LoRA steps on `--images` images (checkpoints and previews off); the validated run adds
validation every `--every` steps (the numbers only: subject loss on the training images, prior drift) and, with
--grid, a grid of 3 prompts x 1 seed at each checkpoint (`--save-every` epochs). Printed: the seconds of each run and
the overhead in percent; --json writes them. Timings include data preparation (cached once before both runs).

Analytic cost of one validation (what the numbers need), for n images and P drift prompts (class + 3 neutral):
n UNet forwards of batch 3 (the three timestep bands) + 3 forwards of batch P, no backward: 3 (n + P) sample-forwards.
A training step at batch 1 costs about 3 sample-forwards (forward + backward; 4 with gradient checkpointing), so
with 4 images and one class prompt a validation costs about 8 training steps: 8 % at validate_every_steps = 100.
A grid costs what a preview of 3 prompts costs (preview_steps x 2 with CFG forwards each).

Measured (tiny model, 64 px, 4 images, CPU, shared 2-core machine, profiled): one validation 3.0 s, one training step
0.45-0.55 s: a validation costs about 6 training steps, so ~6 % at validate_every_steps = 100, plus the step-0
baseline once per run (which dominates short runs: 100 steps validated at 0 and 100 measured +36 %, noisy). The
GPU number for an SD-sized model is still to be measured (--model sd15 --device cuda).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # the folder holding the comfyui_dreambooth package


def build_model(name: str):
    from comfyui_dreambooth.training.models.tiny import build_random_sd15, build_tiny_model

    if name == "tiny":
        return build_tiny_model("sd1")
    return build_random_sd15(0, unet="full").replace(source_hash="bench-sd15-0")


def make_images(folder: str, n: int, resolution: int) -> str:
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 255, (resolution // 8, resolution // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((resolution, resolution), Image.Resampling.BICUBIC).save(
            os.path.join(folder, f"{i:03d}.png"))
    return folder


def timed_run(model, concept, settings, root: str, device) -> float:
    from comfyui_dreambooth.training.trainer import train

    start = time.perf_counter()
    train(model, [concept], settings, output_root=root, resume="new", device=device, reuse_finished=False)
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="validate_every_steps of the validated run")
    p.add_argument("--grid", action="store_true", help="also make the grid at each checkpoint")
    p.add_argument("--save-every", type=int, default=0, help="save_every_epochs of both runs (0 = off)")
    p.add_argument("--json", help="write the numbers to this file")
    args = p.parse_args(argv)

    from comfyui_dreambooth.training.data.settings import ConceptSettings, DataSettings
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    model = build_model(args.model)
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        concept = ConceptSettings(instance_dir=make_images(os.path.join(tmp, "images"), args.images, args.resolution),
                                  instance_prompt="a photo of sks dog", class_prompt="a photo of a dog")
        base = DreamBoothSettings(
            steps_per_image=0, max_train_steps=args.steps, text_encoder_ratio=0.0, learning_rate=1e-4,
            mixed_precision="fp16" if cuda else "no", save_every_epochs=args.save_every, preview_every_epochs=0,
            lr_scheduler="constant", keep_last_checkpoints=1,
            data=DataSettings(resolution=args.resolution, bucket_min_side=args.resolution,
                              bucket_max_side=args.resolution))
        validated = base.replace(validate_every_steps=args.every, validation_samples=1 if args.grid else 0)
        timed_run(model, concept, base.replace(max_train_steps=2), os.path.join(tmp, "warm"), args.device)
        off = timed_run(model, concept, base, os.path.join(tmp, "off"), args.device)
        on = timed_run(model, concept, validated, os.path.join(tmp, "on"), args.device)
    result = {"model": args.model, "device": args.device, "resolution": args.resolution, "images": args.images,
              "steps": args.steps, "every": args.every, "grid": args.grid, "seconds_off": round(off, 2),
              "seconds_on": round(on, 2), "overhead_percent": round(100 * (on - off) / off, 1)}
    print(f"{args.model} {args.resolution}px, {args.images} images, {args.steps} steps, validation every "
          f"{args.every}{' + grids' if args.grid else ''}: off {off:.1f} s, on {on:.1f} s "
          f"({result['overhead_percent']:+.1f} %)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
