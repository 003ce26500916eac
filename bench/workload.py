"""The work both trainers do in bench/run.py's end-to-end and MFU parts: the shared settings (prompt, LoRA rank,
learning rates, clipping, seed) and our trainer's side of it, run inside the child processes run.py times
(`python bench/run.py --e2e-child / --mfu-child CFG`): e2e_child and mfu_child. The diffusers side is
diffusers_ref.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

import bench_train_step  # run.py puts bench/ on sys.path (models, images, settings and the bare loop are shared)

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")           # git-ignored: extracted diffusers scripts, child logs
PROMPT = bench_train_step.PROMPT
LORA_RANK = 16
LEARNING_RATE = {"lora": 1e-4, "full": 1e-5}
MAX_GRAD_NORM = 1.0
SEED = 0
# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, matched by substring of torch.cuda.get_device_name(),
# first match wins (so the more specific names come first).
PEAK_TFLOPS = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("A6000", 155.0), ("A40", 150.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
]


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def e2e_settings(mode: str, resolution: int, steps: int, precision: str = "no", batch_size: int = 1,
                 checkpointing: bool = False):
    """bench_train_step's settings (no EMA / previews / intermediate checkpoints, frozen text encoder) with what
    diffusers' scripts do by default: clipping at 1.0, LoRA on the attention projections."""
    cfg = dict(mode=mode, resolution=resolution, warmup=0, steps=steps, precision=precision,
               checkpointing=checkpointing, optimizer="AdamW")
    settings = bench_train_step.bench_settings(cfg)
    return dataclasses.replace(settings, max_grad_norm=MAX_GRAD_NORM, lora_rank=LORA_RANK,
                               lora_alpha=float(LORA_RANK), lora_unet_targets="attention",
                               learning_rate=LEARNING_RATE[mode], batch_size=batch_size, seed=SEED)


def e2e_child(cfg: dict) -> None:
    """One end-to-end run of our trainer (this whole process is what the parent times)."""
    marks = {"start": time.time()}
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    from comfyui_dreambooth.training.data.settings import ConceptSettings
    from comfyui_dreambooth.training.export.checkpoint import export_diffusers
    from comfyui_dreambooth.training.export.lora import save_kohya_lora
    from comfyui_dreambooth.training.models import load_model
    from comfyui_dreambooth.training.trainer import TrainCallbacks, train

    marks["imported"] = time.time()
    device = torch.device(cfg["device"])
    model = load_model(cfg["model_dir"])
    marks["loaded"] = time.time()
    settings = e2e_settings(cfg["mode"], cfg["resolution"], cfg["steps"], cfg.get("precision", "no"))
    concept = ConceptSettings(instance_dir=cfg["images"], instance_prompt=PROMPT)

    def progress(p):
        if p["step"] == 1:
            marks["first_step"] = time.time()

    result = train(model, [concept], settings, output_root=os.path.join(cfg["out"], "runs"), resume="new",
                   device=device, callbacks=TrainCallbacks(progress=progress), reuse_finished=False)
    marks["trained"] = time.time()
    if cfg["mode"] == "lora":
        save_kohya_lora(result.model, os.path.join(cfg["out"], "lora.safetensors"), dtype="fp32")
    else:
        export_diffusers(result.model, os.path.join(cfg["out"], "model"), dtype="fp32")
    marks["exported"] = time.time()
    t0 = cfg.get("spawned", marks["start"])         # the parent's clock at spawn (same machine)
    phases = {"python_start_s": marks["start"] - t0, "imports_s": marks["imported"] - marks["start"],
              "model_load_s": marks["loaded"] - marks["imported"],
              "to_first_step_s": marks.get("first_step", marks["trained"]) - t0,
              "training_s": marks["trained"] - marks.get("first_step", marks["loaded"]),
              "export_s": marks["exported"] - marks["trained"], "steps": result.steps,
              "final_loss": result.final_loss}
    print("RESULT " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in phases.items()}),
          flush=True)


def mfu_child(cfg: dict) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from comfyui_dreambooth.training.data.settings import ConceptSettings
    from comfyui_dreambooth.training.trainer import TrainCallbacks, train

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    warm, steps = cfg["warmup"], cfg["steps"]
    model = bench_train_step.build_model(cfg["model"])
    settings = e2e_settings(cfg["mode"], cfg["resolution"], warm + steps, cfg["precision"], cfg["batch"])
    settings = dataclasses.replace(settings, max_grad_norm=0.0)    # the bare loop does not clip either

    # FLOPs of one forward + backward (+ the optimizer's matmul-free step) at this batch, on the trainer's model
    bare = bench_train_step.BareLoop(model, settings, device)
    bare.latents = bare.latents.repeat(cfg["batch"], 1, 1, 1)
    bare.embeds = bare.embeds.repeat(cfg["batch"], 1, 1)
    bare.step()                                                      # warm (lazy inits outside the count)
    with FlopCounterMode(display=False) as counter:
        bare.step()
    flops = counter.get_total_flops()
    del bare
    if device.type == "cuda":
        torch.cuda.empty_cache()

    work = tempfile.mkdtemp(prefix="bench_run_mfu_")
    try:
        images = bench_train_step.make_images(os.path.join(work, "images"), cfg["batch"], cfg["resolution"])
        times, mark = [], {"end": None}

        def progress(p):
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if mark["end"] is not None and p["step"] > warm:
                times.append(now - mark["end"])
            mark["end"] = now

        concept = ConceptSettings(instance_dir=images, instance_prompt=PROMPT)
        result = train(model, [concept], settings, output_root=os.path.join(work, "out"), resume="new",
                       device=device, callbacks=TrainCallbacks(progress=progress), reuse_finished=False)
        used_precision = result.info.get("mixed_precision", cfg["precision"]) if isinstance(result.info, dict) \
            else cfg["precision"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    step_s = sum(times) / len(times)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    peak = peak_tflops(gpu)
    achieved = flops / step_s / 1e12
    print("RESULT " + json.dumps({"flops_per_step": flops, "step_ms": 1000 * step_s, "achieved_tflops": achieved,
                                  "peak_tflops": peak, "mfu": achieved / peak if peak else None, "gpu": gpu,
                                  "measured_steps": len(times), "precision": used_precision}), flush=True)
