"""`comfyui-dreambooth demo [--output-dir DIR]`: DreamBooth shown working, in about a minute on a CPU.

The default demo runs the shipped toy-world example (example_workflows/Toy world subject on a CPU in a minute.json) headless: the pack's
own pretrained toy base (training/toyworld: 64 px coloured toys) learns a subject its words cannot name, a red/blue
split circle drawn into DIR/input/toyworld/split_circle. Then it measures, with the toy world's evaluator, the base
and the trained model on the same seeds: subject fidelity (share of "a sks toy" samples that show the subject) and
PRES (share of "a toy" samples that show it: the class forgetting what a toy is), and saves one grid, base | trained,
for "a sks toy" and "a sks toy on a blue background" (DIR/demo_grid.png), plus the loss plot (DIR/demo_loss.png).

`--tiny` runs the older machinery-only demo instead: a tiny random-weight SD1 model (DIR/checkpoints/
demo_tiny_sd1.safetensors) and drawn concept images through the LoRA example workflow (class images, training,
export, sampling) in seconds; its images are noise. The tests use it as the quickest whole-pack run.
Cheap to import: everything heavy is imported inside the functions.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

DEMO_WORKFLOW = "LoRA of a person with prior preservation.json"      # the --tiny demo's
TOY_WORKFLOW = "Toy world subject on a CPU in a minute.json"                     # the default demo's
TOY_SUBJECT = "split_circle"
TOY_GRID = "demo_grid.png"
TOY_PROMPTS = ("a sks toy", "a sks toy on a blue background")
TOY_MEASURE_SAMPLES = 12        # per figure and model, at fixed seeds (base and trained see the same noise)
TOY_GRID_SAMPLES = 4
CHECKPOINT_NAME = "demo_tiny_sd1.safetensors"
CONCEPT_FOLDER = "demo_concept"
LORA_NAME = "demo_lora"
SAMPLE_PREFIX = "demo/sample"
LOSS_PLOT = "demo_loss.png"
IMAGE_SIZE = 64
NUM_IMAGES = 4
EPOCHS = 4                  # steps per image: (4 images + 4 class images) x 4 = 32 optimizer steps
# The tiny model's tensors are too small for intra-op threads to pay off, and on a busy machine threads waiting for
# each other cost a lot: on a shared 2-core box the demo took 169 s with 2 torch threads and 20 s with 1.
DEMO_THREADS = 1
# titles of the example workflow's nodes (tests/make_example_workflows.py TITLES)
MODEL, CONCEPT, DATA, SETTINGS, SAMPLE, SAVE = "Base model", "Concept", "Data", "Settings", "Sample", "Save LoRA"


def package_root() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def example_workflow_path(name: str = DEMO_WORKFLOW) -> str:
    return os.path.join(package_root(), "example_workflows", name)


# ------------------------------------------------------------------------------------------------------------------
# Inputs: a tiny model and a drawn concept
# ------------------------------------------------------------------------------------------------------------------
def make_tiny_checkpoint(path: str) -> str:
    """The tiny random SD1 model (training.models.build_tiny_model) as a single-file checkpoint (fp32).

    An existing file is kept: safetensors writes its header in no fixed order, so a re-save of the same weights
    would get another file hash, and the trainer would not recognise the finished run of an earlier demo."""
    from .training.models import build_tiny_model, save_single_file

    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return save_single_file(build_tiny_model("sd1", seed=0), path, dtype="fp32")


# background colours of the concept images: one subject, several scenes (what DreamBooth needs)
_BACKGROUNDS = [(70, 130, 180), (60, 150, 90), (200, 200, 190), (120, 80, 150), (230, 170, 80), (40, 40, 60)]


def draw_concept_image(index: int, size: int = IMAGE_SIZE):
    """One picture of the demo "toy": a red disc with a yellow centre and a dark square base, placed and sized a
    little differently on each background (drawn 4x larger, then downscaled, for smooth edges)."""
    from PIL import Image, ImageDraw

    scale = 4
    big = size * scale
    image = Image.new("RGB", (big, big), _BACKGROUNDS[index % len(_BACKGROUNDS)])
    draw = ImageDraw.Draw(image)
    radius = big * (0.22 + 0.03 * (index % 3))
    cx = big * (0.40 + 0.05 * (index % 4))
    cy = big * (0.42 + 0.04 * ((index + 1) % 3))
    draw.rectangle((cx - radius * 0.6, cy + radius * 0.8, cx + radius * 0.6, cy + radius * 1.4), fill=(50, 40, 40))
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(210, 40, 40))
    draw.ellipse((cx - radius / 3, cy - radius / 3, cx + radius / 3, cy + radius / 3), fill=(250, 220, 60))
    return image.resize((size, size), Image.LANCZOS)


def make_concept_images(folder: str, count: int = NUM_IMAGES, size: int = IMAGE_SIZE) -> list[str]:
    """Write `count` PNGs of the demo toy into `folder`; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"toy_{i + 1:02d}.png")
        draw_concept_image(i, size).save(path, format="PNG")
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------------------------
# The workflow run
# ------------------------------------------------------------------------------------------------------------------
def demo_overrides(checkpoint_name: str, instance_dir: str, *, epochs: int = EPOCHS) -> list[str]:
    """`--set` overrides that turn the LoRA example (SD 1.5 person, 512 px, hours on a GPU) into the demo run
    (tiny model, 64 px, a minute on a CPU)."""
    return [
        f"{MODEL}.model={checkpoint_name}",
        f"{CONCEPT}.instance_dir={instance_dir}",
        f"{CONCEPT}.instance_prompt=a photo of sks toy",
        f"{CONCEPT}.instance_token=sks",
        f"{CONCEPT}.class_prompt=a photo of a toy",
        f"{CONCEPT}.class_token=toy",
        f"{CONCEPT}.num_class_images_per_image=1",       # prior preservation stays on, with few class images
        f"{CONCEPT}.class_steps=2",
        f"{CONCEPT}.sample_prompt=a photo of sks toy",
        f"{CONCEPT}.concept_type=object",
        f"{DATA}.resolution={IMAGE_SIZE}",
        f"{DATA}.bucketing=false",
        f"{SETTINGS}.lora_rank=4",
        f"{SETTINGS}.lora_alpha=4",
        f"{SETTINGS}.steps_per_image={epochs}",
        f"{SETTINGS}.learning_rate=0.001",                 # a random tiny model: a big rate shows the loss move
        f"{SETTINGS}.text_encoder_lr=0.0005",
        f"{SETTINGS}.lr_warmup_steps=2",
        f"{SETTINGS}.mixed_precision=no",                  # CPU
        f"{SETTINGS}.save_every_epochs=0",
        f"{SETTINGS}.preview_every_epochs=0",              # SampleTrained shows the result instead
        f"{SETTINGS}.run_name=demo",
        f"{SAMPLE}.prompt=a photo of sks toy",
        f"{SAMPLE}.width={IMAGE_SIZE}",
        f"{SAMPLE}.height={IMAGE_SIZE}",
        f"{SAMPLE}.steps=6",
        f"{SAMPLE}.scheduler=euler",
        f"{SAMPLE}.filename_prefix={SAMPLE_PREFIX}",
        f"{SAVE}.filename={LORA_NAME}",
        f"{SAVE}.overwrite=true",
    ]


def read_loss_log(run_dir: str) -> list[dict]:
    """The run's loss.jsonl records (one per optimizer step); unreadable lines are skipped."""
    records = []
    path = os.path.join(run_dir, "loss.jsonl")
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("loss"), (int, float)) \
                    and math.isfinite(record["loss"]):
                records.append(record)
    return records


def smoothed(values: list[float], weight: float = 0.8) -> list[float]:
    """Debiased exponential moving average (what TensorBoard's smoothing slider shows)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def plot_loss(records: list[dict], path: str, size: tuple[int, int] = (640, 360), title: str = "training loss") -> str:
    """Draw the loss curve (raw + smoothed) against the step as a PNG with PIL; returns the path."""
    from PIL import Image, ImageDraw, ImageFont

    from .training.fsutil import atomic_path

    width, height = size
    left, right, top, bottom = 60, 20, 34, 40
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 10), title, fill=(20, 20, 20), font=font)
    x0, y0, x1, y1 = left, top, width - right, height - bottom
    draw.rectangle((x0, y0, x1, y1), outline=(120, 120, 120))
    steps = [float(r.get("step", i + 1)) for i, r in enumerate(records)]
    losses = [float(r["loss"]) for r in records]
    if not records:
        draw.text((x0 + 10, (y0 + y1) // 2), "no loss values logged", fill=(160, 0, 0), font=font)
    else:
        lo, hi = min(losses), max(losses)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        pad = (hi - lo) * 0.05
        lo, hi = lo - pad, hi + pad
        s_lo, s_hi = min(steps), max(steps)
        s_span = (s_hi - s_lo) or 1.0

        def xy(step, loss):
            return (x0 + (step - s_lo) / s_span * (x1 - x0), y1 - (loss - lo) / (hi - lo) * (y1 - y0))

        for k in range(1, 4):                          # horizontal grid lines with their values
            y = y0 + k * (y1 - y0) / 4
            draw.line((x0, y, x1, y), fill=(230, 230, 230))
            draw.text((4, y - 6), f"{hi - k * (hi - lo) / 4:.4g}", fill=(90, 90, 90), font=font)
        draw.text((4, y0 - 6), f"{hi:.4g}", fill=(90, 90, 90), font=font)
        draw.text((4, y1 - 6), f"{lo:.4g}", fill=(90, 90, 90), font=font)
        raw_points = [xy(s, v) for s, v in zip(steps, losses)]
        smooth_points = [xy(s, v) for s, v in zip(steps, smoothed(losses))]
        if len(raw_points) == 1:
            raw_points = smooth_points = raw_points * 2
        draw.line(raw_points, fill=(150, 190, 235), width=1)
        draw.line(smooth_points, fill=(20, 70, 170), width=3)
        draw.text((x0, y1 + 6), f"step {int(s_lo)}", fill=(90, 90, 90), font=font)
        draw.text((x1 - 60, y1 + 6), f"step {int(s_hi)}", fill=(90, 90, 90), font=font)
        draw.text((x0 + 140, 10), "light: raw   dark: smoothed", fill=(20, 70, 170), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


@dataclass
class DemoResult:
    output_dir: str
    checkpoint: str
    concept_images: list[str]
    run_dir: str
    lora: str
    samples: list[str]
    loss_plot: str
    steps: int
    final_loss: float | None
    seconds: float
    workflow: str
    overrides: list[str] = field(default_factory=list)
    node_seconds: dict = field(default_factory=dict)      # the runner's timings, by node title

    def summary(self) -> str:
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "-"
        lines = [f"demo finished in {self.seconds:.0f}s: {self.steps} training steps, final loss {loss}",
                 f"  base model      {self.checkpoint}",
                 f"  concept images  {os.path.dirname(self.concept_images[0])} ({len(self.concept_images)} images)",
                 f"  workflow        {self.workflow}",
                 f"  run folder      {self.run_dir}  (config.json, loss.jsonl, previews/)",
                 f"  LoRA            {self.lora}",
                 *[f"  sample          {p}" for p in self.samples],
                 f"  loss plot       {self.loss_plot}",
                 "Next: copy the workflow into ComfyUI (or `comfyui-dreambooth run` it) with your own model and photos."]
        return "\n".join(lines)


@contextlib.contextmanager
def torch_threads(count: int | None):
    """torch's intra-op thread count set to `count` for the block (None: unchanged), then restored."""
    import torch

    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(output_dir: str, *, show_progress: bool = True, stream: TextIO | None = None,
             epochs: int = EPOCHS, threads: int | None = DEMO_THREADS) -> DemoResult:
    """Build the inputs under `output_dir`, run the LoRA example headless, plot the loss; returns the paths."""
    with torch_threads(threads):
        return _run_demo(output_dir, show_progress=show_progress, stream=stream, epochs=epochs)


def _run_demo(output_dir: str, *, show_progress: bool, stream: TextIO | None, epochs: int) -> DemoResult:
    from .runner import run_workflow, saved_files

    stream = stream if stream is not None else sys.stdout
    started = time.monotonic()
    output_dir = os.path.abspath(output_dir)
    checkpoint = os.path.join(output_dir, "checkpoints", CHECKPOINT_NAME)   # headless models live in DIR/<kind>
    print(f"{'reusing' if os.path.isfile(checkpoint) else 'building'} the tiny model: {checkpoint}", file=stream)
    make_tiny_checkpoint(checkpoint)
    concept_dir = os.path.join(output_dir, "input", CONCEPT_FOLDER)
    images = make_concept_images(concept_dir)
    print(f"drew {len(images)} concept images: {concept_dir}", file=stream)
    workflow = example_workflow_path()
    overrides = demo_overrides(CHECKPOINT_NAME, concept_dir, epochs=epochs)
    print(f"running {workflow} headless", file=stream)
    result = run_workflow(workflow, overrides=overrides, output_dir=output_dir, show_progress=show_progress)

    classes = {node_id: node["class_type"] for node_id, node in result["prompt"].items()}
    train_id = next(i for i, c in classes.items() if c == "TrainDreamBooth")
    save_id = next(i for i, c in classes.items() if c == "SaveLoRA")
    run_dir = result["results"][train_id][1][0]
    lora = result["results"][save_id][0][0]
    samples = [p for p in saved_files(result) if os.path.relpath(p, output_dir).startswith(os.path.dirname(SAMPLE_PREFIX))]
    records = read_loss_log(run_dir)
    loss_plot = plot_loss(records, os.path.join(output_dir, LOSS_PLOT), title="demo LoRA: loss per step")
    return DemoResult(output_dir=output_dir, checkpoint=checkpoint, concept_images=images, run_dir=run_dir,
                      lora=lora, samples=samples, loss_plot=loss_plot, steps=len(records),
                      final_loss=records[-1]["loss"] if records else None,
                      seconds=time.monotonic() - started, workflow=workflow, overrides=overrides,
                      node_seconds={result["prompt"][i]["_meta"]["title"]: t for i, t in result["timings"].items()})


# ------------------------------------------------------------------------------------------------------------------
# The toy-world demo (the default)
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class ToyDemoResult:
    output_dir: str
    workflow: str
    instance_dir: str
    run_dir: str
    saved: str                      # the trained checkpoint or LoRA the workflow saved
    grid: str
    loss_plot: str
    steps: int
    final_loss: float | None
    before: dict                    # {"subject_fidelity", "pres"} of the untrained base
    after: dict                     # the same of the trained model
    seconds: float
    train_seconds: float
    samples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "-"
        n = TOY_MEASURE_SAMPLES
        return "\n".join([
            f"demo finished in {self.seconds:.0f}s ({self.train_seconds:.0f}s training): {self.steps} steps, "
            f"final loss {loss}",
            f"                       base   trained   ({n} samples each, same seeds)",
            f"  subject fidelity     {self.before['subject_fidelity']:<6.2f} {self.after['subject_fidelity']:<9.2f}"
            f" share of 'a sks toy' samples showing the subject (higher is better)",
            f"  PRES                 {self.before['pres']:<6.2f} {self.after['pres']:<9.2f}"
            f" share of 'a toy' samples showing it (the class drifting to the subject; lower is better)",
            f"  concept images  {self.instance_dir}",
            f"  workflow        {self.workflow}",
            f"  run folder      {self.run_dir}  (config.json, loss.jsonl)",
            f"  trained model   {self.saved}",
            f"  grid            {self.grid}  (base | trained: '{TOY_PROMPTS[0]}', '{TOY_PROMPTS[1]}')",
            *[f"  sample          {p}" for p in self.samples],
            f"  loss plot       {self.loss_plot}",
            "Next: load the workflow in ComfyUI (Templates > comfyui-dreambooth) and swap in your own model and photos."])


def toy_overrides(instance_dir: str, run_name: str = "demo_toy") -> list[str]:
    """The toy example as shipped, with the demo's concept folder and output names (so it never overwrites a user's
    files)."""
    return [f"{CONCEPT}.instance_dir={instance_dir}", f"{SETTINGS}.run_name={run_name}",
            "Subject.filename_prefix=demo/toy_subject", "New scene.filename_prefix=demo/toy_new",
            "Class (prior).filename_prefix=demo/toy_class", "Save checkpoint.filename=demo/toy_split_circle",
            "Save checkpoint.overwrite=true"]


def measure_toy(model, judge, subject) -> dict:
    """Subject fidelity and PRES of `model` at the demo's fixed seeds (training.toyworld.dreambench)."""
    from .training.toyworld import dreambench

    return {"subject_fidelity": dreambench.subject_fidelity(model, subject, judge, TOY_MEASURE_SAMPLES),
            "pres": dreambench.pres(model, judge, TOY_MEASURE_SAMPLES)}


def draw_toy_grid(base, trained, path: str, prompts=TOY_PROMPTS, per_prompt: int = TOY_GRID_SAMPLES,
                  seed: int = 2000) -> str:
    """One PNG: a row per prompt, `per_prompt` samples of the base on the left and of the trained model on the right
    (same seeds), labelled."""
    from PIL import Image, ImageDraw, ImageFont

    from .training.fsutil import atomic_path
    from .training.toyworld import dreambench

    cell, gap, label_h, pad = 64, 12, 16, 4
    half = per_prompt * cell
    width = 2 * half + gap
    height = label_h + len(prompts) * (label_h + cell + pad)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    draw.text((4, 2), "base (untrained)", fill=(60, 60, 60), font=font)
    draw.text((half + gap + 4, 2), "trained", fill=(20, 70, 170), font=font)
    y = label_h
    for prompt in prompts:
        draw.text((4, y + 2), prompt, fill=(20, 20, 20), font=font)
        y += label_h
        for column, model in ((0, base), (half + gap, trained)):
            for i, image in enumerate(dreambench.sample(model, [prompt] * per_prompt, seed)):
                grid.paste(image.convert("RGB").resize((cell, cell)), (column + i * cell, y))
        y += cell + pad
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def run_toy_demo(output_dir: str, *, show_progress: bool = True, stream: TextIO | None = None,
                 threads: int | None = DEMO_THREADS) -> ToyDemoResult:
    """Run the toy example headless under `output_dir`, then measure base vs trained and draw the grid."""
    with torch_threads(threads):
        return _run_toy_demo(output_dir, show_progress=show_progress, stream=stream)


def _run_toy_demo(output_dir: str, *, show_progress: bool, stream: TextIO | None) -> ToyDemoResult:
    import torch

    from .runner import run_workflow, saved_files
    from .training.models import load_model
    from .training.toyworld import dreambench
    from .training.toyworld.commands import base_path, subject_folder
    from .training.toyworld.world import SUBJECTS

    stream = stream if stream is not None else sys.stdout
    started = time.monotonic()
    output_dir = os.path.abspath(output_dir)
    workflow = example_workflow_path(TOY_WORKFLOW)
    instance_dir = subject_folder(TOY_SUBJECT, os.path.join(output_dir, "input"))
    print(f"drew the subject (a red/blue split circle) into {instance_dir}", file=stream)
    print(f"running {workflow} headless", file=stream)
    result = run_workflow(workflow, overrides=toy_overrides(instance_dir), output_dir=output_dir,
                          show_progress=show_progress)
    classes = {node_id: node["class_type"] for node_id, node in result["prompt"].items()}
    train_id = next(i for i, c in classes.items() if c == "TrainDreamBooth")
    save_id = next(i for i, c in classes.items() if c in ("SaveCheckpoint", "SaveLoRA"))
    trained = result["results"][train_id][0][0]
    run_dir = result["results"][train_id][1][0]
    saved = result["results"][save_id][0][0]

    print("measuring base and trained model on the same seeds", file=stream)
    from PIL import Image

    subject = SUBJECTS[TOY_SUBJECT]
    instances = [Image.open(os.path.join(instance_dir, f)).convert("RGB")
                 for f in sorted(os.listdir(instance_dir)) if f.lower().endswith(".png")]
    judge = dreambench.judge_for(subject, instances, count=100)
    base = load_model(base_path(), dtype="fp32")
    with torch.inference_mode():
        before, after = measure_toy(base, judge, subject), measure_toy(trained, judge, subject)
        grid = draw_toy_grid(base, trained, os.path.join(output_dir, TOY_GRID))
    records = read_loss_log(run_dir)
    loss_plot = plot_loss(records, os.path.join(output_dir, LOSS_PLOT), title="toy demo: loss per step")
    samples = [p for p in saved_files(result) if os.path.relpath(p, output_dir).startswith("demo")]
    return ToyDemoResult(output_dir=output_dir, workflow=workflow, instance_dir=instance_dir, run_dir=run_dir,
                         saved=saved, grid=grid, loss_plot=loss_plot, steps=len(records),
                         final_loss=records[-1]["loss"] if records else None, before=before, after=after,
                         seconds=time.monotonic() - started, train_seconds=float(result["timings"][train_id]),
                         samples=samples)


# ------------------------------------------------------------------------------------------------------------------
# CLI (registered in cli.py)
# ------------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="dreambooth-demo",
                        help="folder for everything the demo writes (default: ./dreambooth-demo)")
    parser.add_argument("--quiet", action="store_true", help="no per-node progress lines")
    parser.add_argument("--threads", type=int, default=DEMO_THREADS,
                        help=f"torch CPU threads (default {DEMO_THREADS}: the 64 px models gain nothing from more)")
    parser.add_argument("--tiny", action="store_true",
                        help="the machinery-only demo instead: a tiny random model through the LoRA example "
                             "(seconds; its images are noise)")


def main(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise ValueError(f"--threads {args.threads}: must be at least 1")
    run = run_demo if args.tiny else run_toy_demo
    result = run(args.output_dir, show_progress=not args.quiet, threads=args.threads)
    print(result.summary())
    return 0


__all__ = ["run_toy_demo", "ToyDemoResult", "toy_overrides", "measure_toy", "draw_toy_grid", "run_demo", "DemoResult", "torch_threads", "make_tiny_checkpoint", "make_concept_images", "draw_concept_image",
           "demo_overrides", "read_loss_log", "plot_loss", "smoothed", "example_workflow_path"]
