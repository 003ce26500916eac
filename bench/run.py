"""Benchmark suite: one command that runs the benchmarks of issue 14 and prints one table per part.

    python bench/run.py --quick --diffusers-examples DIR   # CPU, a few minutes: tiny model, 30 steps
    python bench/run.py --diffusers-examples DIR           # CPU: tiny (64 px) + small (128 px) models, 100 steps
    python bench/run.py --device cuda --diffusers-examples DIR   # GPU: SD1.5 size at 512 px, + MFU at batch 8 bf16
    python bench/run.py --device cpu --flops --parts mfu   # CPU dry run of the MFU measurement (tiny model)
    python bench/run.py --diffusers-git GIT_DIR [--diffusers-ref v0.40.0] ...   # DIR extracted from a diffusers clone

DIR is a checkout of diffusers' examples/dreambooth folder (train_dreambooth.py, train_dreambooth_lora.py); it is
never part of this repository. `--diffusers-git` extracts those two scripts from a diffusers git directory (a clone
or a bare mirror) at REF (default: the tag of the installed diffusers, else the nearest older tag) into the
git-ignored bench/.cache/diffusers-<ref>/examples/dreambooth/ and uses that. Without either, part c is skipped
with a note ("skipped" in the JSON).

Parts (--parts, default all that apply):
  step   our optimizer step against the bare floor: bench/bench_train_step.py run as a subprocess with --json
         (interleaved in one process, --no-separate; on cuda --sd15). Target: trainer step <= 1.05x the floor.
  e2e    wall time, process start to exit, of a LoRA run and a full fine-tune run of OUR trainer: a fresh
         `python bench/run.py --e2e-child ...` process that imports the pack, loads the model from a diffusers
         folder (training.models.load_model), trains with `train()` (data scan, latent / text-embedding caching,
         the steps, the final resumable checkpoint) and exports the result as diffusers' scripts do (the LoRA as
         a .safetensors file, the full model as a diffusers folder, both fp32). The child also reports its phases
         (imports, model load, start-up to the first step, training, export).
  diffusers  the same work with diffusers' train_dreambooth_lora.py / train_dreambooth.py, each a fresh process
         (`python SCRIPT ...`, its default flags plus the shared ones below), with a small torchvision stand-in
         (bench/_torchvision_standin) on PYTHONPATH: the real torchvision does not import beside this CPU torch.
         Reported: wall time and diffusers / ours. Target: >= 1.5.
  mfu    model FLOP utilisation at batch 8, bf16 mixed precision (cuda: always; cpu: with --flops, as a dry run):
         FLOPs of one UNet forward + backward at batch 8 (torch.utils.flop_counter.FlopCounterMode on one step of
         bench_train_step's bare loop, built the trainer's way) / our trainer's measured step time / the GPU's
         dense bf16 peak (PEAK_TFLOPS by torch.cuda.get_device_name). On CPU MFU is n/a (no peak table).

Same work for both trainers: the same model (saved once in diffusers layout: training.models.save_diffusers), the
same 4 instance images (random noise, exactly the resolution so no crop changes them), prompt "a photo of sks dog",
no prior preservation, frozen text encoder, batch 1, STEPS steps (100; --quick 30), AdamW (weight decay 0.01, eps
1e-8), constant learning rate 1e-4 (LoRA) / 1e-5 (full), gradient clipping at 1.0, LoRA rank 16 alpha 16 on the
attention projections (q/k/v/out: diffusers' targets), mixed precision "no", seed 0, no validation, no
intermediate checkpoints, OMP_NUM_THREADS = --threads for every process (default 1 on CPU: tiny tensors gain
nothing from threads and lose a lot on a busy machine; 0 = leave torch's default). The processes run one at a
time. What differs is what each trainer does by design: diffusers' scripts VAE-encode every image and run the text
encoder at every step, re-load the pipeline at the end; ours caches latents and embeddings once and writes a
resumable final checkpoint.

Results: tables on stdout and JSON in bench/results/run-<device>-<time>.json (or --json PATH) with the machine
(CPU model, cores, GPU, torch / diffusers / transformers / peft / accelerate versions), the settings, the exact
diffusers commands and which diffusers scripts (ref, commit, sha256) were used. Child logs go to
bench/.cache/run-logs/<time>/ (git-ignored).

This file is the orchestrator (arguments, child processes, tables, JSON); what the children do and the shared
settings are workload.py, the diffusers scripts and their command line diffusers_ref.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # the folder holding the comfyui_dreambooth package
sys.path.insert(0, HERE)
# the work (workload.py) and the diffusers reference (diffusers_ref.py) are files of their own beside this one
from diffusers_ref import (diffusers_command, diffusers_scripts, diffusers_source,  # noqa: E402
                           extract_diffusers_examples, tqdm_elapsed)
from workload import CACHE, LEARNING_RATE, LORA_RANK, MAX_GRAD_NORM, PROMPT, SEED, e2e_child, mfu_child  # noqa: E402

STANDIN = os.path.join(HERE, "_torchvision_standin")
STEPS, QUICK_STEPS = 100, 30
NUM_IMAGES = 4
TARGET_STEP_RATIO = 1.05            # trainer step / bare step, at most
TARGET_E2E_SPEEDUP = 1.5            # diffusers wall / ours, at least
MODELS = {"cpu": {"tiny": 64, "small": 128}, "cuda": {"sd15": 512}}
QUICK_MODELS = {"cpu": ["tiny"], "cuda": ["sd15"]}
MFU_BATCH = 8
MFU_STEPS = {"cpu": (1, 2), "cuda": (5, 20)}         # (warm-up, measured)


# ----------------------------------------------------------------------------------------------------------------
# Small helpers (cheap: no torch)
# ----------------------------------------------------------------------------------------------------------------
def format_table(columns: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain-text table: text columns left-aligned, numbers right-aligned, None as '-'."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) if rows else False
               for i in range(len(columns))]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    out = [title] if title else []
    out += [line(columns).rstrip(), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    out += [line(r).rstrip() for r in text]
    return "\n".join(out)


def verdict(value, target: float, at_most: bool) -> str:
    if value is None:
        return "n/a"
    return "ok" if (value <= target if at_most else value >= target) else "MISSED"


def machine_info(device: str) -> dict:
    import importlib.metadata as md

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "device": device, "platform": platform.platform(),
            "python": platform.python_version(), "host": platform.node()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    for package in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = None
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = torch.cuda.device_count()
    return info


def child_env(threads: int, standin: bool = False) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DIFFUSERS_NO_ADVISORY_WARNINGS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if standin:      # the torchvision stand-in for the diffusers scripts only
        env["PYTHONPATH"] = os.pathsep.join([STANDIN] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def run_timed(cmd: list[str], env: dict, log_path: str, timeout: float, cwd: str | None = None) -> dict:
    """Run `cmd` as a fresh process: wall seconds from spawn to exit, its own peak RSS, exit code; output to log."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"wall_s": round(wall, 2), "exit": proc.returncode, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
              "log": log_path}
    if wall > timeout:
        result["error"] = f"killed after {timeout:.0f} s"
    elif proc.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = [ln.rstrip() for ln in f.read().splitlines() if ln.strip()]
        result["error"] = (tail or ["no output"])[-1][:300]
    return result


def _result_line(log_path: str) -> dict | None:
    with open(log_path, encoding="utf-8", errors="replace") as f:
        lines = [ln for ln in f.read().splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None


# ----------------------------------------------------------------------------------------------------------------
# Inputs shared by both trainers
# ----------------------------------------------------------------------------------------------------------------
def prepare_inputs(work: str, model_name: str, resolution: int) -> dict:
    """The model in diffusers layout and the instance images, once per model (in a child: the parent stays light)."""
    model_dir = os.path.join(work, f"model-{model_name}")
    images = os.path.join(work, f"images-{resolution}")
    if not os.path.isdir(model_dir):
        code = ("import sys; sys.path[:0] = [{here!r}, {root!r}]\n"
                "import bench_train_step as b\n"
                "from comfyui_dreambooth.training.models import save_diffusers\n"
                "save_diffusers(b.build_model({name!r}), {out!r}, dtype='fp32')\n"
                "b.make_images({images!r}, {n}, {res})\n").format(
            here=HERE, root=os.path.dirname(os.path.dirname(HERE)), name=model_name, out=model_dir, images=images,
            n=NUM_IMAGES, res=resolution)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(1))
        if proc.returncode != 0:
            raise RuntimeError(f"could not prepare the {model_name} model:\n{proc.stderr[-3000:]}")
    return {"model_dir": model_dir, "images": images}


# ----------------------------------------------------------------------------------------------------------------
# a) step vs floor
# ----------------------------------------------------------------------------------------------------------------
def run_step_part(args, models: list[str], log_dir: str) -> dict:
    out = os.path.join(log_dir, "train_step.json")
    cmd = [sys.executable, os.path.join(HERE, "bench_train_step.py"), "--no-separate", "--json", out,
           "--threads", str(args.threads)]
    if args.device == "cuda":
        cmd += ["--sd15", "--device", "cuda"]
    else:
        cmd += ["--models", ",".join(models)]
    print(f"... step vs floor: {' '.join(cmd[1:])}", flush=True)
    res = run_timed(cmd, child_env(args.threads), os.path.join(log_dir, "train_step.log"), args.timeout * 4)
    if "error" in res or not os.path.isfile(out):
        return {"error": res.get("error", "no JSON written"), "log": res["log"], "command": cmd}
    with open(out, encoding="utf-8") as f:
        data = json.load(f)
    rows = [{"model": r["model"], "mode": r["mode"], "device": r["device"], "resolution": r["resolution"],
             "trainer_ms": r["trainer"]["mean_ms"], "bare_ms": r["bare"]["mean_ms"], "ratio": r["ratio_mean"],
             "ratio_median": r["ratio_median"], "steps": r["steps"], "warmup": r["warmup"]} for r in data["rows"]]
    return {"command": cmd, "rows": rows, "target": TARGET_STEP_RATIO, "raw": data}


def step_table(part: dict) -> str:
    if "rows" not in part:
        return f"a) step vs floor: FAILED ({part.get('error')}; log {part.get('log')})"
    rows = [[r["model"], r["mode"], r["resolution"], r["trainer_ms"], r["bare_ms"], r["ratio"], r["ratio_median"],
             verdict(r["ratio"], TARGET_STEP_RATIO, at_most=True)] for r in part["rows"]]
    return format_table(["model", "mode", "res", "ours ms/step", "floor ms/step", "ratio", "median", "<=1.05"],
                        rows, "a) optimizer step: ours vs the bare floor (bench_train_step, interleaved)")


# ----------------------------------------------------------------------------------------------------------------
# b) our end-to-end run, c) diffusers' scripts
# ----------------------------------------------------------------------------------------------------------------
def run_ours(args, model_name: str, mode: str, inputs: dict, work: str, log_dir: str) -> dict:
    out = os.path.join(work, f"ours-{model_name}-{mode}")
    cfg = {"model_dir": inputs["model_dir"], "images": inputs["images"], "mode": mode, "device": args.device,
           "resolution": MODELS[args.device][model_name], "steps": args.steps, "out": out, "threads": args.threads,
           "precision": "no", "spawned": time.time()}
    cmd = [sys.executable, os.path.abspath(__file__), "--e2e-child", json.dumps(cfg)]
    res = run_timed(cmd, child_env(args.threads), os.path.join(log_dir, f"ours-{model_name}-{mode}.log"),
                    args.timeout)
    phases = _result_line(res["log"])
    if phases:
        res["phases"] = phases
    shutil.rmtree(out, ignore_errors=True)
    return res


def run_import_floor(args, log_dir: str) -> dict:
    """A process that only imports torch + diffusers + transformers (and the classes both trainers load): the
    start-up no trainer of this stack can avoid."""
    code = ("import torch, diffusers, transformers\n"
            "from diffusers import AutoencoderKL, UNet2DConditionModel\n"
            "from transformers import CLIPTextModel\n")
    return run_timed([sys.executable, "-c", code], child_env(args.threads), os.path.join(log_dir, "import-floor.log"),
                     args.timeout)


def run_diffusers(args, scripts: dict, model_name: str, mode: str, inputs: dict, work: str, log_dir: str) -> dict:
    out = os.path.join(work, f"diffusers-{model_name}-{mode}")
    cmd = diffusers_command(scripts[mode], mode, inputs, MODELS[args.device][model_name], args.steps, out)
    res = run_timed(cmd, child_env(args.threads, standin=True),
                    os.path.join(log_dir, f"diffusers-{model_name}-{mode}.log"), args.timeout, cwd=work)
    res["command"] = cmd
    with open(res["log"], encoding="utf-8", errors="replace") as f:
        res["training_s"] = tqdm_elapsed(f.read(), args.steps)      # whole seconds (tqdm's resolution)
    shutil.rmtree(out, ignore_errors=True)
    return res


def e2e_table(rows: list[dict], diffusers_note: str | None, import_floor: dict | None = None) -> str:
    table = []
    for r in rows:
        ours, ref = r.get("ours") or {"error": "not run"}, r.get("diffusers")
        ours_s = None if "error" in ours else ours["wall_s"]
        ref_s = None if not ref or "error" in ref else ref["wall_s"]
        speedup = ref_s / ours_s if ours_s and ref_s else None
        phases = ours.get("phases", {})
        table.append([r["model"], r["mode"], r["resolution"], r["steps"], ours_s, phases.get("to_first_step_s"),
                      phases.get("training_s"), ref_s if ref else "skipped", (ref or {}).get("training_s"), speedup,
                      verdict(speedup, TARGET_E2E_SPEEDUP, at_most=False) if ref else "skipped"])
    text = format_table(["model", "mode", "res", "steps", "ours s", "1st step s", "ours train s", "diffusers s",
                         "diff. train s", "diffusers/ours", ">=1.5"], table,
                        "b/c) end-to-end wall time, process start to exit (ours vs diffusers' example scripts)")
    text += ("\nours: 1st step s = process start to the first optimizer step (imports, model load, data scan, "
             "latent / text caching); ours train s = first step to the end of train() (incl. the final checkpoint). "
             "diff. train s = the diffusers script's tqdm bar (whole seconds).")
    if import_floor and "error" not in import_floor:
        text += (f"\nimport floor: a process that only imports torch + diffusers + transformers takes "
                 f"{import_floor['wall_s']:.1f} s here (part of every run above).")
    errors = [f"  {who} {r['model']} {r['mode']}: {r[who]['error']} (log {r[who]['log']})"
              for r in rows for who in ("ours", "diffusers") if r.get(who) and "error" in r[who]]
    if errors:
        text += "\nFAILED:\n" + "\n".join(errors)
    if diffusers_note:
        text += "\n" + diffusers_note
    return text


# ----------------------------------------------------------------------------------------------------------------
# d) model FLOP utilisation (the measurement itself runs in a child: workload.mfu_child)
# ----------------------------------------------------------------------------------------------------------------
def run_mfu_part(args, log_dir: str) -> dict:
    model = "sd15" if args.device == "cuda" else "tiny"
    resolution = args.mfu_resolution or (512 if args.device == "cuda" else 64)
    warm, steps = MFU_STEPS[args.device]
    rows = []
    for mode in args.modes:
        cfg = {"model": model, "mode": mode, "device": args.device, "resolution": resolution, "batch": MFU_BATCH,
               "precision": "bf16", "warmup": warm, "steps": steps, "threads": args.threads}
        print(f"... MFU {model} {mode} batch {MFU_BATCH} bf16 at {resolution} px", flush=True)
        res = run_timed([sys.executable, os.path.abspath(__file__), "--mfu-child", json.dumps(cfg)],
                        child_env(args.threads), os.path.join(log_dir, f"mfu-{model}-{mode}.log"), args.timeout)
        row = {**cfg, **res}
        row.update(_result_line(res["log"]) or {})
        rows.append(row)
    return {"rows": rows}


def mfu_table(part: dict) -> str:
    rows = []
    for r in part["rows"]:
        if "flops_per_step" not in r:
            rows.append([r["model"], r["mode"], r["batch"], r["precision"], None, None, None, None,
                         f"FAILED: {r.get('error')}"])
            continue
        rows.append([r["model"], r["mode"], r["batch"], r["precision"], r["flops_per_step"] / 1e9, r["step_ms"],
                     r["achieved_tflops"], r["peak_tflops"],
                     "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"])
    return format_table(["model", "mode", "batch", "precision", "GFLOP/step", "ms/step", "TFLOP/s", "peak TFLOP/s",
                         "MFU"], rows, "d) model FLOP utilisation (FLOPs of one forward+backward / our step time "
                                       "/ dense bf16 peak)")


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, tiny model only (CPU: minutes)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--diffusers-examples", default=None, metavar="DIR",
                        help="diffusers' examples/dreambooth folder (train_dreambooth.py, train_dreambooth_lora.py)")
    parser.add_argument("--diffusers-git", default=None, metavar="GIT_DIR",
                        help="extract DIR from this diffusers git directory (clone or bare mirror)")
    parser.add_argument("--diffusers-ref", default=None, help="tag / commit for --diffusers-git; recorded in the JSON")
    parser.add_argument("--parts", default=None, help="comma list of step,e2e,diffusers,mfu (default: all that apply)")
    parser.add_argument("--models", default=None, help="comma list (cpu: tiny,small; cuda: sd15)")
    parser.add_argument("--modes", default="lora,full", help="lora, full (comma-separated)")
    parser.add_argument("--steps", type=int, default=None, help=f"end-to-end steps (default {STEPS}, --quick "
                                                                f"{QUICK_STEPS})")
    parser.add_argument("--flops", action="store_true", help="CPU: also run the MFU measurement (a dry run)")
    parser.add_argument("--mfu-resolution", type=int, default=None, help="MFU image size (default 512 cuda, 64 cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS / torch threads of every child (default 1 on cpu, 0 = torch's default "
                             "on cuda)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per child process")
    parser.add_argument("--json", default=None, help="where to write the results (default bench/results/...)")
    parser.add_argument("--log-dir", default=None, help="child logs (default bench/.cache/run-logs/<time>)")
    parser.add_argument("--e2e-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mfu-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in LEARNING_RATE]
    if bad:
        parser.error(f"--modes: unknown {', '.join(bad)} (lora, full)")
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else STEPS
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.models:
        args.models = [m for m in args.models.split(",") if m]
    else:
        args.models = list(QUICK_MODELS[args.device] if args.quick else MODELS[args.device])
    unknown = [m for m in args.models if m not in MODELS[args.device]]
    if unknown:
        parser.error(f"--models on {args.device}: unknown {', '.join(unknown)} ({', '.join(MODELS[args.device])})")
    parts = ["step", "e2e", "diffusers"] + (["mfu"] if args.device == "cuda" or args.flops else [])
    if args.parts:
        parts = [p for p in args.parts.split(",") if p]
        bad = [p for p in parts if p not in ("step", "e2e", "diffusers", "mfu")]
        if bad:
            parser.error(f"--parts: unknown {', '.join(bad)} (step, e2e, diffusers, mfu)")
    args.parts = parts
    if args.diffusers_examples and args.diffusers_git:
        parser.error("give --diffusers-examples or --diffusers-git, not both")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.e2e_child:
        e2e_child(json.loads(args.e2e_child))
        return 0
    if args.mfu_child:
        mfu_child(json.loads(args.mfu_child))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda needs a CUDA GPU (on a CPU: --device cpu --flops for a dry run of the MFU part)")
            return 2

    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = args.log_dir or os.path.join(CACHE, "run-logs", stamp)
    os.makedirs(log_dir, exist_ok=True)
    if args.diffusers_git:
        args.diffusers_examples = extract_diffusers_examples(args.diffusers_git, args.diffusers_ref)
        print(f"diffusers scripts extracted into {args.diffusers_examples}")
    result = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(args.device),
              "args": {k: v for k, v in vars(args).items() if not k.endswith("_child")},
              "settings": {"steps": args.steps, "batch_size": 1, "lora_rank": LORA_RANK, "lora_alpha": LORA_RANK,
                           "learning_rate": LEARNING_RATE, "max_grad_norm": MAX_GRAD_NORM, "mixed_precision": "no",
                           "seed": SEED, "images": NUM_IMAGES, "prompt": PROMPT, "threads": args.threads,
                           "resolutions": {m: MODELS[args.device][m] for m in args.models}},
              "targets": {"step_ratio_at_most": TARGET_STEP_RATIO, "e2e_speedup_at_least": TARGET_E2E_SPEEDUP},
              "logs": log_dir}
    tables = []

    if "step" in args.parts:
        part = run_step_part(args, args.models, log_dir)
        result["step"] = part
        tables.append(step_table(part))
        print(tables[-1] + "\n", flush=True)

    scripts, note = diffusers_scripts(args.diffusers_examples) if "diffusers" in args.parts else (None, None)
    if "diffusers" in args.parts:
        result["diffusers"] = {"skipped": note} if note else diffusers_source(args.diffusers_examples,
                                                                               args.diffusers_ref)
        if note:
            print(note, flush=True)
    if "e2e" in args.parts or scripts:
        rows = []
        work = tempfile.mkdtemp(prefix="bench_run_")
        print("... import floor (torch + diffusers + transformers)", flush=True)
        floor = run_import_floor(args, log_dir)
        try:
            for model_name in args.models:
                resolution = MODELS[args.device][model_name]
                print(f"... preparing the {model_name} model ({resolution} px) in diffusers layout", flush=True)
                inputs = prepare_inputs(work, model_name, resolution)
                for mode in args.modes:
                    row = {"model": model_name, "mode": mode, "resolution": resolution, "steps": args.steps}
                    if "e2e" in args.parts:
                        print(f"... ours {model_name} {mode}: {args.steps} steps", flush=True)
                        row["ours"] = run_ours(args, model_name, mode, inputs, work, log_dir)
                        print(f"    {row['ours'].get('error') or str(row['ours']['wall_s']) + ' s'}", flush=True)
                    if scripts:
                        print(f"... diffusers {os.path.basename(scripts[mode])} {model_name}: {args.steps} steps",
                              flush=True)
                        row["diffusers"] = run_diffusers(args, scripts, model_name, mode, inputs, work, log_dir)
                        print(f"    {row['diffusers'].get('error') or str(row['diffusers']['wall_s']) + ' s'}",
                              flush=True)
                    if row.get("ours") and row.get("diffusers") and "error" not in row["ours"] \
                            and "error" not in row["diffusers"]:
                        row["diffusers_over_ours"] = row["diffusers"]["wall_s"] / row["ours"]["wall_s"]
                    rows.append(row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        result["e2e"] = {"rows": rows, "diffusers_skipped": note, "import_floor": floor}
        tables.append(e2e_table(rows, note, floor))
        print(tables[-1] + "\n", flush=True)

    if "mfu" in args.parts:
        part = run_mfu_part(args, log_dir)
        result["mfu"] = part
        tables.append(mfu_table(part))
        print(tables[-1] + "\n", flush=True)

    print("=" * 100)
    print("\n\n".join(tables))
    path = args.json or os.path.join(HERE, "results", f"run-{args.device}-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
