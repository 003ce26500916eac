"""`comfyui-dreambooth` (also `python -m comfyui_dreambooth`): the pack's tools outside ComfyUI.

    comfyui-dreambooth info MODEL
    comfyui-dreambooth convert IN OUT [--dtype keep|fp16|bf16|fp32]
    comfyui-dreambooth sample MODEL --prompt "a photo of sks dog" --out dog.png [--steps 20 --seed 0 ...]
                              [--lora LORA_FILE_OR_RUN_FOLDER [--which best]]
    comfyui-dreambooth run WORKFLOW.json [--set "Title.input=value" ...] [--output-dir DIR]
    comfyui-dreambooth demo [--output-dir DIR]
    comfyui-dreambooth toyworld base OUT.safetensors | toyworld draw DIR [--subject S | --toy T] [--count N]
    comfyui-dreambooth estimate MODEL|sd15|sd2|sdxl [--workflow WF.json] [--set name=value ...] [--vram GB] [--measure]
                         [--json]
    comfyui-dreambooth wizard MODEL|sd15|sd2|sdxl --vram GB [--images N] [--resolution R] [--mode auto|lora|full]
                       [--concept-type person|object|style] [--json]

Every failure ends with ONE line on stderr naming the file and the problem, and a non-zero exit
(1 = error, 130 = interrupted); `--debug` prints the traceback instead.

Adding a subcommand: write `def _my_arguments(parser)` and register the handler with
`@command("name", "one-line help", arguments=_my_arguments)`; the handler gets the argparse namespace and returns
an exit code (None = 0). Heavy imports (torch, diffusers, the training code) go inside handlers: `--help` and
argument errors must stay instant.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable

# torch-free modules (--help stays instant): the file, dtype, prediction and seed vocabulary is defined once there
from .training.models.components import PREDICTION_TYPES
from .training.models.state_dict import DTYPE_CHOICES, KEEP_DTYPE, SINGLE_FILE_EXTS
from .training.sampling import MAX_SEED

PROG = "comfyui-dreambooth"
EXIT_ERROR, EXIT_INTERRUPTED = 1, 130
IMAGE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
PREDICTION_CHOICES = ("auto", *PREDICTION_TYPES)
LONGEST_WORD_SHOWN = 160          # longer words of an error line (paths, values) keep their start and end
# argparse destination -> how the command line spells it, for "is empty" errors
PATH_ARGUMENTS = {"model": "MODEL", "input": "IN", "output": "OUT", "out": "--out", "vae": "--vae",
                  "workflow": "WORKFLOW", "output_dir": "--output-dir"}


class CliError(Exception):
    """A problem to report as one line (no traceback)."""


@dataclass
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] | None
    handler: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *, arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register a subcommand (see the module docstring)."""
    def register(handler):
        COMMANDS[name] = Command(name, help, arguments, handler)
        return handler
    return register


@contextlib.contextmanager
def about(path: str):
    """Errors raised inside are reported as `error: <path>: <message>` (unless the message already names it)."""
    try:
        yield
    except BaseException as exc:
        if getattr(exc, "cli_path", None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                exc.cli_path = path
        raise


def _article(number: float) -> str:
    """ "an" before a number said with a vowel sound (8, 11, 18, 80, 800...), else "a"."""
    digits = f"{number:g}"
    return "an" if digits.startswith("8") or (digits[:2] in ("11", "18") and len(digits.split(".")[0]) in (2, 5))\
        else "a"


def _require_exists(path: str, what: str = "file") -> None:
    if not os.path.exists(path):
        raise CliError(f"{what} not found")


def check_arguments(args: argparse.Namespace) -> None:
    """What holds for every command: numbers are finite (argparse's float() takes 'nan' and 'inf'), paths are
    not empty ('' silently meant the current folder)."""
    for dest, value in vars(args).items():
        option = "--" + dest.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise CliError(f"{option} {value}: must be a finite number")
        if dest in PATH_ARGUMENTS and isinstance(value, str) and not value.strip():
            raise CliError(f"{PATH_ARGUMENTS[dest]} is empty: give a file or folder path")


def check_output_dir(path: str) -> None:
    """--output-dir must be a path the file system can hold, with room for what is saved inside it."""
    from .training.export.naming import path_length_problem

    problem = path_length_problem(path, room=1024)
    if problem:
        raise CliError(f"--output-dir {path}: {problem}, leaving room for the files saved inside it; "
                       "choose a shorter path")


# ------------------------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------------------------
def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="single-file checkpoint (.safetensors/.ckpt) or diffusers folder")


@command("info", "print a model's family, prediction type and zero-terminal SNR (with where each came from), "
                 "parameter counts and dtype as JSON",
         arguments=_info_arguments)
def cmd_info(args: argparse.Namespace) -> int:
    with about(args.model):
        _require_exists(args.model, "model")
        from .training.models import inspect_model
        report = inspect_model(args.model)
    print(json.dumps(report, indent=2, default=str))
    return 0


# ------------------------------------------------------------------------------------------------------------------
# convert
# ------------------------------------------------------------------------------------------------------------------
def _convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="single-file checkpoint or diffusers folder")
    p.add_argument("output", help="OUT.safetensors / .ckpt = single file; anything else = diffusers folder")
    p.add_argument("--dtype", choices=(KEEP_DTYPE,) + DTYPE_CHOICES, default=KEEP_DTYPE,
                   help="weights precision of the output (default keep: every tensor as in the input, lossless)")
    p.add_argument("--prediction-type", choices=PREDICTION_CHOICES, default="auto",
                   help="override what the input says (auto: its markers and weights, see `info`)")
    p.add_argument("--vae", help="replace the VAE with this file or folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is a model (a diffusers folder with model_index.json, or a model file); "
                        "any other folder is refused")


def output_is_single_file(path: str) -> bool:
    return path.lower().endswith(SINGLE_FILE_EXTS)


@command("convert", "convert single-file <-> diffusers (by OUT's extension / folder)", arguments=_convert_arguments)
def cmd_convert(args: argparse.Namespace) -> int:
    with about(args.input):
        _require_exists(args.input, "input model")
    single = output_is_single_file(args.output)
    with about(args.output):
        real_in, real_out = os.path.realpath(args.input), os.path.realpath(args.output)
        if real_out == real_in:
            raise CliError("output is the input; choose another path")
        if os.path.lexists(args.output) and not args.overwrite:
            raise CliError("already exists; pass --overwrite to replace it")
        if not single and os.path.isfile(args.output):
            raise CliError("is a file, but a diffusers output must be a folder (or give OUT a .safetensors/.ckpt name)")
        if os.path.isdir(args.output) and real_in.startswith(real_out.rstrip(os.sep) + os.sep):
            raise CliError("holds the input, which replacing it would delete; choose another output folder")
        if os.path.lexists(args.output):
            from .training.fsutil import check_replaceable
            check_replaceable(args.output)    # --overwrite replaces a model, never a folder of the user's
    from .training.models import load_model, save_diffusers, save_single_file
    with about(args.input):
        model = load_model(args.input, prediction_type=args.prediction_type, vae_path=args.vae)
    with about(args.output):
        if single:
            save_single_file(model, args.output, dtype=args.dtype)
        else:
            save_diffusers(model, args.output, dtype=args.dtype)
    kind = "single file" if single else "diffusers folder"
    zt = ", zero-terminal SNR" if model.zero_terminal_snr else ""
    precision = "dtypes kept" if args.dtype == KEEP_DTYPE else args.dtype
    print(f"wrote {args.output} ({kind}, {model.family}, {model.prediction_type}{zt}, {precision})")
    return 0


# ------------------------------------------------------------------------------------------------------------------
# sample
# ------------------------------------------------------------------------------------------------------------------
def _sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="single-file checkpoint or diffusers folder")
    p.add_argument("--prompt", action="append", required=True,
                   help="the prompt; repeat for several prompts (one image each)")
    p.add_argument("--out", required=True, help="image file (.png/.jpg/.webp); several images: OUT_0.png, OUT_1.png ...")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale")
    p.add_argument("--scheduler", default="euler", help="pndm, lms, ddim, euler, euler_a, dpmpp_2m, "
                                                         "dpmpp_2m_karras, unipc")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--width", type=int, help="default: 1024 for SDXL, 768 for SD2 v-prediction, else 512")
    p.add_argument("--height", type=int, help="default: as --width")
    p.add_argument("--batch", type=int, default=1, help="images for a single prompt")
    p.add_argument("--clip-skip", type=int, help="1 = last CLIP layer (default: the family's own)")
    p.add_argument("--prediction-type", choices=PREDICTION_CHOICES, default="auto")
    p.add_argument("--vae", help="use this VAE file or folder")
    p.add_argument("--dtype", choices=("auto",) + DTYPE_CHOICES, default="auto",
                   help="compute precision (auto: fp32 on CPU, bf16/fp16 on GPU)")
    p.add_argument("--overwrite", action="store_true", help="replace image files that already exist")
    p.add_argument("--lora", help="put a trained run onto the model first: a LoRA file written by SaveLoRA (its "
                                  "Imagic sidecar too), a run folder or one of its checkpoint folders")
    p.add_argument("--which", choices=("last", "best"), default="last",
                   help="with a run folder: its final state (last) or keep_best's best checkpoint (best)")


def default_size(model) -> int:
    if model.family == "sdxl":
        return 1024
    if model.family == "sd2" and model.prediction_type == "v_prediction":
        return 768
    return 512


def image_paths(out: str, count: int) -> list[str]:
    """OUT for one image; OUT_0.ext, OUT_1.ext ... for several."""
    if count == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}_{i}{ext}" for i in range(count)]


def save_image(image, path: str, parameters: str = "") -> None:
    """Write one PIL image atomically; PNGs carry the generation parameters as a text chunk."""
    from .training.fsutil import atomic_path

    kind = IMAGE_EXTENSIONS[os.path.splitext(path)[1].lower()]
    options = {}
    if kind == "PNG" and parameters:
        from PIL.PngImagePlugin import PngInfo
        info = PngInfo()
        info.add_text("parameters", parameters)
        options["pnginfo"] = info
    with atomic_path(path) as tmp:
        image.save(tmp, format=kind, **options)


def _compute_dtype(choice: str, device) -> str:
    if choice != "auto":
        return choice
    if device.type != "cuda":
        return "fp32"
    import torch
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


@command("sample", "generate images from a model", arguments=_sample_arguments)
def cmd_sample(args: argparse.Namespace) -> int:
    with about(args.out):
        if os.path.splitext(args.out)[1].lower() not in IMAGE_EXTENSIONS:
            raise CliError(f"--out must end in {', '.join(IMAGE_EXTENSIONS)}")
    if args.batch < 1:
        raise CliError(f"--batch {args.batch}: must be at least 1")
    if len(args.prompt) > 1 and args.batch > 1:
        raise CliError("--batch works with a single --prompt (several prompts give one image each)")
    count = len(args.prompt) if len(args.prompt) > 1 else args.batch
    if not 0 <= args.seed <= MAX_SEED:
        raise CliError(f"--seed {args.seed}: must be 0..{MAX_SEED}")
    if args.seed + count - 1 > MAX_SEED:
        many = f"--batch {args.batch}" if args.batch > 1 else f"{count} prompts"
        raise CliError(f"--seed {args.seed} with {many}: image i uses seed + i, which must stay at most {MAX_SEED}; "
                       f"use --seed {MAX_SEED - count + 1} or lower")
    for path in image_paths(args.out, count):     # before any work: nothing is replaced unless asked
        if os.path.lexists(path) and not args.overwrite:
            with about(path):
                raise CliError("already exists; pass --overwrite to replace it")
    with about(args.model):
        _require_exists(args.model, "model")
    from .nodes.comfy_compat import comfy_torch_device
    from .nodes.terminal_progress import TerminalProgress
    from .training.models import load_model
    from .training.sampling import SCHEDULER_NAMES, generate, to_pil

    if args.scheduler not in SCHEDULER_NAMES:
        raise CliError(f"--scheduler {args.scheduler!r}: choose one of {', '.join(SCHEDULER_NAMES)}")
    device = comfy_torch_device()
    dtype = _compute_dtype(args.dtype, device)
    with about(args.model):
        model = load_model(args.model, prediction_type=args.prediction_type, vae_path=args.vae, dtype=dtype)
    if args.lora:
        from .training.reload import load_trained

        with about(args.lora):
            _require_exists(args.lora, "--lora")
            model = load_trained(model, args.lora, args.which)
    if args.clip_skip is not None:
        from .training.models.text import max_clip_skip

        deepest = max_clip_skip(model)
        if not 0 <= args.clip_skip <= deepest:
            raise CliError(f"--clip-skip {args.clip_skip}: this model's text encoder has {deepest} layers; choose "
                           f"1..{deepest} (1 = the last layer, 2 = the penultimate) or 0 for the family's default "
                           f"({model.default_clip_skip})")
    for module in [model.unet, model.vae, *model.text_encoders]:
        module.to(device)
    width = args.width or default_size(model)
    height = args.height or args.width or default_size(model)
    prompts = args.prompt[0] if len(args.prompt) == 1 else list(args.prompt)
    bar = TerminalProgress(args.steps, label="sampling")
    try:
        images = generate(model, prompts, negative_prompt=args.negative, steps=args.steps, cfg=args.cfg,
                          seed=args.seed, width=width, height=height, batch_size=args.batch,
                          scheduler=args.scheduler, clip_skip=args.clip_skip,
                          progress=lambda done, total: bar.update_absolute(done, total))
    finally:
        bar.close()
    pil_images = to_pil(images)
    paths = image_paths(args.out, len(pil_images))
    all_prompts = [prompts] * len(pil_images) if isinstance(prompts, str) else prompts
    with about(args.out):
        for i, (image, path) in enumerate(zip(pil_images, paths)):
            parameters = (f"{all_prompts[i]}\nNegative prompt: {args.negative}\nSteps: {args.steps}, "
                          f"Sampler: {args.scheduler}, CFG scale: {args.cfg}, Seed: {args.seed + i}, "
                          f"Size: {width}x{height}, Model: {os.path.basename(os.path.normpath(args.model))}")
            save_image(image, path, parameters)
    for path in paths:
        print(path)
    return 0


# ------------------------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------------------------
def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workflow", help="workflow JSON: API format (/prompt) or a saved canvas workflow")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help='override an input of the node with that title or id, e.g. --set "Train.steps=50"; '
                        "VALUE is JSON when it parses, else text (repeatable)")
    p.add_argument("--output-dir", default="output", help="folder used in place of ComfyUI's output folder")
    p.add_argument("--quiet", action="store_true", help="no per-node progress lines")
    p.add_argument("--json", action="store_true", help="print the result (outputs, timings) as JSON: stdout holds the JSON alone, the run's "
                        "own lines go to stderr")
    p.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="train data-parallel in N processes on this machine (one per GPU; on a CPU-only machine N "
                        "CPU processes): the same as `accelerate launch --num_processes N -m comfyui_dreambooth run "
                        "...`. Effective batch = N x batch_size x gradient_accumulation_steps")


def check_process_count(count: int) -> None:
    """One process per GPU (per CPU core on a machine without one): more would only compete for the same device."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    limit, what = (gpus, f"{gpus} GPU(s)") if gpus else (os.cpu_count() or 1, f"no GPU and {os.cpu_count() or 1} "
                                                                                   "CPU core(s)")
    if count > limit:
        raise CliError(f"--num-processes {count}: this machine has {what}; start at most {limit} (one process per "
                       f"{'GPU' if gpus else 'core'})")


def check_for_processes(workflow: str, overrides, output_dir: str, processes: int) -> None:
    """Before `processes` processes start: the workflow reads, and no training node's settings are ones several
    processes refuse (fused_backward, Imagic), so the reason is said once, not by every process after start-up.
    A config chain that needs the model (a PerformanceWizard, which then avoids fused_backward itself) is left to
    the processes."""
    from .nodes import comfy_compat
    from .runner import WorkflowError, pack_node_classes, prepare_workflow
    from .runner.configs import config_of, label, training_nodes

    with comfy_compat.using_output_directory(os.path.abspath(output_dir)):
        prompt = prepare_workflow(workflow, overrides=overrides).prompt
        for node_id in training_nodes(prompt, pack_node_classes()):
            try:
                config = config_of(prompt, node_id)
            except (WorkflowError, ValueError, TypeError):   # what cannot be computed here, the processes check
                continue
            refused = (["fused_backward (it steps each weight before the gradients are averaged across processes)"]
                       if config.fused_backward else [])
            refused += ["train_imagic_only (Imagic edits one photo in one process)"] if config.train_imagic_only else []
            if refused:
                raise CliError(f"--num-processes {processes}: {label(prompt, node_id)} trains with "
                               f"{' and '.join(refused)}, which several processes refuse; turn it off, or run "
                               "without --num-processes")


def _relaunch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run this same command in `--num-processes` processes under torch's launcher (torchrun, single machine)."""
    import subprocess

    if args.num_processes < 1:
        raise CliError(f"--num-processes {args.num_processes}: give 1 or more")
    rest, skip = [], False
    for a in argv:                       # the command line without --num-processes
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            rest.append(a)
    from .runner.launch import launch_processes

    return launch_processes(rest, args.num_processes, __package__ or "comfyui_dreambooth")


@command("run", "execute a workflow of this pack's nodes headless", arguments=_run_arguments)
def cmd_run(args: argparse.Namespace) -> int:
    from .runner import WorkflowInterrupted, run_workflow, saved_files
    from .training.distributed import pin_local_device, process_info, stopped_together

    rank, processes = process_info()
    if args.num_processes < 1:
        raise CliError(f"--num-processes {args.num_processes}: give the number of processes to train in, 1 or more "
                       "(one per GPU)")
    if args.num_processes > 1 and processes == 1:
        check_process_count(args.num_processes)
        check_output_dir(args.output_dir)
        with about(args.workflow):
            check_for_processes(args.workflow, args.overrides, args.output_dir, args.num_processes)
        return _relaunch(args, args.argv)
    pin_local_device()
    check_output_dir(args.output_dir)
    # --json: stdout holds the JSON alone; the pack's lines and the nodes' prints go to stderr with the progress
    lines_to = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with about(args.workflow), lines_to:
            result = run_workflow(args.workflow, overrides=args.overrides, output_dir=args.output_dir,
                                  show_progress=not args.quiet)
    except Exception as exc:
        # training stopped on every process at the same step (a checkpoint is written): exit cleanly, so the
        # launcher reports no failure; `run --num-processes` reports the interrupt. Any other stop or error exits
        # with its code, and the launcher ends the processes that may be waiting for this one
        if processes > 1 and stopped_together():
            if rank == 0:
                print(error_line(exc), file=sys.stderr)
            return 0
        if processes > 1 and rank > 0 and isinstance(exc, WorkflowInterrupted):
            return EXIT_INTERRUPTED       # process 0 says it (a real error on this process is still printed)
        raise
    if rank > 0:                          # rank 0 reports for all processes
        return 0
    if args.json:
        summary = {k: result[k] for k in ("status", "format", "output_dir", "executed", "outputs", "timings")}
        print(json.dumps(summary, indent=2, default=str))
    else:
        total = sum(result["timings"].values())
        print(f"ran {len(result['executed'])} node(s) in {total:.1f}s; output folder {result['output_dir']}")
        for path in saved_files(result):
            print(path)
    return 0


# ------------------------------------------------------------------------------------------------------------------
# estimate / wizard (training/memory.py)
# ------------------------------------------------------------------------------------------------------------------
MAX_VRAM_GB = 16384           # a card's memory in GB; more is a typo (1e308 overflowed the byte count)
MODEL_OR_FAMILY_HELP = ("checkpoint file or diffusers folder (loaded), or a family size keyword: sd15, sd2 or sdxl "
                        "(the architecture is built without weights: nothing to download or load)")


def _memory_model(spec: str):
    from .training.memory import FAMILY_KEYWORDS

    if spec.strip().lower() in FAMILY_KEYWORDS:
        return spec.strip().lower()
    with about(spec):
        _require_exists(spec, "model")
        from .training.models import load_model
        return load_model(spec)


def check_vram(vram: float | None) -> None:
    if vram is not None and not 0 < vram <= MAX_VRAM_GB:
        raise CliError(f"--vram {vram:g}: give the card's memory in GB, more than 0 and at most {MAX_VRAM_GB}, "
                       "e.g. --vram 8")


def check_settings(settings) -> None:
    """Settings the trainer would refuse are refused here too (an estimate of them means nothing)."""
    problems = settings.validate(check_environment=False)
    if problems:
        raise CliError("the trainer would refuse these settings: " + "; ".join(problems))


def _setting_value(text: str):
    if text.strip().lower() == "auto":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_setting_overrides(settings, overrides):
    """`name=value` pairs (setting names as on the settings nodes; data settings such as resolution too)."""
    from .training.settings import DreamBoothSettings

    d = settings.to_dict()
    for item in overrides:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CliError(f"--set {item!r}: expected name=value, e.g. --set batch_size=2")
        if name in d["data"]:
            d["data"][name] = _setting_value(value)
        elif name in d and name != "data":
            d[name] = _setting_value(value)
        else:
            raise CliError(f"--set {name}: not a setting; use a widget name of the DreamBooth settings nodes")
    return DreamBoothSettings.from_dict(d)


def configs_from_workflow(path: str, model, vram_gb: float | None = None) -> list[tuple[str, object]]:
    """(label, DB_CONFIG) for each training node of a workflow: the chain that feeds its config input (settings
    nodes in any order, a PerformanceWizard planned for `model` and `vram_gb`), computed by the nodes themselves
    without running anything else. Without a training node: the end of each settings chain."""
    from .runner import pack_node_classes, prepare_workflow
    from .runner.configs import config_of, label, settings_ends, training_nodes

    prompt = prepare_workflow(path).prompt
    targets = training_nodes(prompt, pack_node_classes()) or settings_ends(prompt)
    if not targets:
        raise CliError("the workflow has no DreamBooth settings node")
    say = lambda line: print(line, file=sys.stderr)       # noqa: E731 - stdout may hold the JSON alone
    with contextlib.redirect_stdout(sys.stderr):          # concept scans print their lines
        return [(label(prompt, t), config_of(prompt, t, model=model, vram_gb=vram_gb, log=say)) for t in targets]


def _estimate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_OR_FAMILY_HELP)
    p.add_argument("--workflow", help="take the settings from this workflow's DreamBooth settings nodes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting by its widget name, e.g. --set batch_size=2 --set resolution=768 (repeatable; "
                        "VALUE is JSON when it parses, 'auto' for auto)")
    p.add_argument("--vram", type=float, help="compare with a card of this many GB (default: the detected GPU)")
    p.add_argument("--json", action="store_true", help="print JSON: settings, estimate_gb, explanation")
    p.add_argument("--measure", action="store_true",
                   help="also account one real training step of these settings at full size on fake tensors "
                        "(no GPU, no weights; about 1 min for SD1.5, a few for SDXL): the peak per part and the "
                        "step that holds it (JSON: measured_gb, measured_by)")


@command("estimate", "estimate the VRAM a training run needs, per part (weights, gradients, optimizer, "
                     "activations, ...)", arguments=_estimate_arguments)
def cmd_estimate(args: argparse.Namespace) -> int:
    from .training.devices import GB
    from .training.memory import ESTIMATE_NOTE, estimate
    from .training.settings import DreamBoothSettings
    from .training.wizard import WIZARD_SETTINGS

    check_vram(args.vram)
    model = _memory_model(args.model)
    targets = [("", DreamBoothSettings())]
    if args.workflow:
        with about(args.workflow):
            _require_exists(args.workflow, "workflow")
            targets = configs_from_workflow(args.workflow, model, args.vram)
    targets = [(name, apply_setting_overrides(settings, args.overrides)) for name, settings in targets]
    for name, settings in targets:
        try:
            check_settings(settings)
        except CliError as e:
            raise CliError(f"{name}: {e}" if name else str(e)) from None
    shown = []
    for name, settings in targets:
        if args.json:
            est = estimate(model, settings)
            resolved = settings.resolved()      # auto values as the estimate (and the wizard) fill them in
            out = {"settings": {k: getattr(resolved, k) for k in WIZARD_SETTINGS} | {
                       "resolution": resolved.data.resolution},
                   "estimate_gb": est.gb(), "explanation": ESTIMATE_NOTE}
            if args.vram is not None:           # the verdict for the card named
                out |= {"vram_gb": args.vram, "fits": est.total <= int(args.vram * GB)}
            if args.measure:
                out |= _measured_json(model, settings)
            shown.append({"node": name, **out} if len(targets) > 1 else out)
        else:
            text = _estimate_text(model, settings, args.vram)
            if args.measure:
                from .training.memory_measure import measure

                text += ("\n\nAccounted (one real training step on fake tensors, the accelerator's share):\n"
                         + measure(model, settings).table())
            shown.append((f"{name}:\n" if len(targets) > 1 else "") + text)
    if args.json:
        print(json.dumps(shown[0] if len(shown) == 1 else {"trains": shown}, indent=2))
    else:
        print("\n\n".join(shown))
    return 0


def _measured_json(model, settings) -> dict:
    """`estimate --measure --json`: the accounted peak of one real training step (training/memory_measure.py)."""
    from .training.devices import GB
    from .training.memory_measure import MEASURED_BY, measure

    m = measure(model, settings)
    return {"measured_gb": m.gb(), "measured_by": MEASURED_BY, "measured_peak_at": m.peak_at,
            "measured_stages_gb": {k: round(v / GB, 3) for k, v in m.stages.items()},
            "measured_host_gb": round(m.host / GB, 3),
            "measured_resident_gb": {k: round(v / GB, 3) for k, v in m.resident.items()},
            "measured_notes": m.notes, "measured_seconds": round(m.seconds, 1)}


def _estimate_text(model, settings, vram: float | None) -> str:
    from .training.devices import GB, DeviceMemory
    from .training.memory import estimate_report

    if vram is not None:
        return estimate_report(model, settings, DeviceMemory(f"{_article(vram)} {vram:g} GB card", int(vram * GB)))
    # the settings nodes' text, for the device training would use here
    from .nodes.comfy_compat import comfy_torch_device
    from .training.devices import read_device

    memory, found = read_device(comfy_torch_device())
    return estimate_report(model, settings, memory, device_label=found)


def _wizard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=MODEL_OR_FAMILY_HELP)
    p.add_argument("--vram", type=float, required=True, help="GB of accelerator memory to fit")
    p.add_argument("--images", type=int, default=10, help="number of training images (the batch size divides it)")
    p.add_argument("--resolution", type=int, help="training resolution (default: 512 SD1, 768 SD2, 1024 SDXL)")
    p.add_argument("--mode", choices=("auto", "lora", "full"), default="auto",
                   help="auto = full fine-tune when it fits, else LoRA")
    p.add_argument("--concept-type", choices=("person", "object", "style"), default="person")
    p.add_argument("--json", action="store_true", help="print JSON: settings, estimate_gb, explanation")


@command("wizard", "choose settings that fit a card's VRAM, and explain each choice", arguments=_wizard_arguments)
def cmd_wizard(args: argparse.Namespace) -> int:
    from .training.data.settings import DataSettings
    from .training.wizard import choose_settings

    check_vram(args.vram)
    if args.images < 1:
        raise CliError(f"--images {args.images}: give the number of training images (1 or more)")
    if args.resolution is not None:
        problems = DataSettings(resolution=args.resolution).validate()
        if problems:
            raise CliError(f"--resolution {args.resolution}: " + "; ".join(problems))
    model = _memory_model(args.model)
    result = choose_settings(model, args.vram, images=args.images, resolution=args.resolution, mode=args.mode,
                             concept_type=args.concept_type)
    check_settings(result.settings)
    out = result.to_json_dict()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(result.explanation)
        print("settings: " + ", ".join(f"{k}={v}" for k, v in out["settings"].items()))
        print(result.estimate.table())
    return 0 if result.fits else EXIT_ERROR


# ------------------------------------------------------------------------------------------------------------------
# demo (demo.py)
# ------------------------------------------------------------------------------------------------------------------
def _demo_arguments(p: argparse.ArgumentParser) -> None:
    from .demo import add_arguments
    add_arguments(p)


@command("demo", "DreamBooth in a minute on a CPU: the toy base learns a drawn subject; prints base vs trained figures "
         "(--tiny: the machinery on a tiny random model)",
         arguments=_demo_arguments)
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main
    return demo_main(args)


# ------------------------------------------------------------------------------------------------------------------
# toyworld (training/toyworld/commands.py)
# ------------------------------------------------------------------------------------------------------------------
def _toyworld_arguments(p: argparse.ArgumentParser) -> None:
    from .training.toyworld.commands import add_arguments
    add_arguments(p)


@command("toyworld", "the toy world: write its pretrained base (toyworld base OUT) or draw its images "
         "(toyworld draw DIR)", arguments=_toyworld_arguments)
def cmd_toyworld(args: argparse.Namespace) -> int:
    from .training.toyworld.commands import main as toyworld_main
    return toyworld_main(args)


# ------------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="DreamBooth for ComfyUI: tools outside ComfyUI.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors")
        if cmd.arguments is not None:
            cmd.arguments(p)
        p.set_defaults(handler=cmd.handler)
    return parser


def _known_error_types() -> tuple:
    from .runner import WorkflowError
    return (CliError, WorkflowError, ValueError, OSError, ImportError, MemoryError)


def error_line(exc: BaseException) -> str:
    """`error: <file>: <problem>` — one line, no traceback."""
    if isinstance(exc, OSError) and exc.strerror:
        other_file = exc.filename and os.fspath(exc.filename) != getattr(exc, "cli_path", None)
        message = exc.strerror + (f": {exc.filename}" if other_file else "")
    else:
        message = str(exc) or type(exc).__name__
    if isinstance(exc, RecursionError):       # a safety net: the readers refuse deep nesting themselves
        message = "nested too deeply (or a path with too many parts) to process"
    elif not isinstance(exc, _known_error_types()):
        message = f"unexpected {type(exc).__name__}: {message} (re-run with --debug for the traceback)"
    path = getattr(exc, "cli_path", None)
    if path and path not in message:
        message = f"{path}: {message}"
    # newlines inside messages would break the one-line rule; a 6000-character path would bury the message
    return "error: " + " ".join(shorten_word(word) for word in message.split())


def shorten_word(word: str, limit: int = LONGEST_WORD_SHOWN) -> str:
    """A word (a path, a value) longer than `limit` characters as its start + '...' + its end."""
    if len(word) <= limit:
        return word
    keep = (limit - 3) // 2
    return word[:keep] + "..." + word[-keep:]


def _pack_warnings_on_one_line(show_library_warning):
    """warnings.showwarning: the pack's own warnings (e.g. a model file's malformed stored config) as
    `warning: <message>`, like the error lines; any other warning as before."""
    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith(__package__ + "."):
            print("warning: " + " ".join(shorten_word(w) for w in str(message).split()), file=file or sys.stderr)
        else:
            show_library_warning(message, category, filename, lineno, file, line)
    return show


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)     # `run --num-processes` relaunches it
    from .training.quiet import is_verbose, quiet_libraries, set_verbose

    verbose = is_verbose()
    set_verbose(verbose or args.debug)     # --debug: library notices, warnings and progress bars as they come
    show_warning = warnings.showwarning
    warnings.showwarning = _pack_warnings_on_one_line(show_warning)
    try:
        check_arguments(args)
        with quiet_libraries():            # otherwise the pack's own lines only
            return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        from .runner import WorkflowInterrupted
        print(error_line(exc), file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(exc, WorkflowInterrupted) else EXIT_ERROR
    finally:
        warnings.showwarning = show_warning
        set_verbose(verbose)
