"""Benchmark: steady-state optimizer-step time of `train()` against a bare training loop.

    python bench/bench_train_step.py                           # CPU: tiny + small model, LoRA + full fine-tune
    python bench/bench_train_step.py --models tiny --modes lora --steps 60 --threads 2
    python bench/bench_train_step.py --sd15                    # CUDA: SD1.5-size random UNet, 512x512, batch 1

The bare loop is the least a training step can do: noise + UNet forward/backward + optimizer step (+ zero_grad)
on inputs cached in memory (one latent, one text embedding). It runs on the same model (built by the trainer's
own `build_trainable`, so the same weights, adapters and optimizer) in the same process. The two are
interleaved step by step: `train()`'s progress callback runs one bare step between two trainer steps, and the
time spent in the callback is excluded from the trainer's step. Both see the same machine load, so the ratio
stays meaningful on a busy machine. The trainer runs with settings that do no extra work the bare loop skips
(no gradient clipping, EMA, previews, checkpoints; frozen text encoder with cached embeddings): the ratio is the
loop's overhead (data loading from the latent cache, seeded generators, loss weights, logging, progress, NaN
check). Target: <= 1.05.

Peak memory: each configuration also runs the trainer alone and the bare loop alone in fresh processes, so
their peak RSS (and on CUDA `torch.cuda.max_memory_allocated`) are their own.

Results: a table on stdout and JSON in bench/results/train_step-<device>-<time>.json (or --json PATH).

--sd15 (CUDA; the lead runs it on a GPU machine): a diffusers UNet2DConditionModel with its default SD1.5
layout (cross_attention_dim 768), random init, the SD VAE and a CLIP-L-size text encoder, 512x512, batch 1.
LoRA (rank 16, bf16) and full fine-tune with the memory-saving settings: gradient checkpointing, 8-bit AdamW when
bitsandbytes works on this GPU (else AdamW), bf16 mixed precision (--precision fp16 for fp16 + loss scaling).
Reports it/s, the ratio and peak `torch.cuda.max_memory_allocated`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # the folder holding the comfyui_dreambooth package

PROMPT = "a photo of sks dog"
CPU_MODELS = {"tiny": dict(resolution=64), "small": dict(resolution=128)}
DEFAULT_STEPS = {"tiny": (5, 40), "small": (2, 10), "sd15": (5, 30)}      # (warm-up, measured) steps


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def build_model(name: str, seed: int = 0):
    """tiny: the test model; small: a 3-level UNet (64,128,256) x 2 layers (tiny VAE + CLIP);
    sd15: the SD1.5 UNet layout, the SD VAE and a CLIP-L-size text encoder (all random init)."""
    import torch
    from diffusers import UNet2DConditionModel

    from comfyui_dreambooth.training.models import build_tiny_model

    tiny = build_tiny_model("sd1", seed=seed)
    if name == "tiny":
        return tiny
    torch.manual_seed(seed)
    if name == "small":
        unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                    block_out_channels=(64, 128, 256), norm_num_groups=32, cross_attention_dim=32,
                                    attention_head_dim=8,
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
        return tiny.replace(unet=unet, source_hash=f"bench-small-{seed}")
    if name == "sd15":
        from comfyui_dreambooth.training.models.tiny import build_random_sd15

        return build_random_sd15(seed).replace(source_hash=f"bench-sd15-{seed}")
    raise ValueError(f"unknown model {name!r}")


def make_images(folder: str, n: int, size: int) -> str:
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(os.path.join(folder, f"{i}.png"))
    return folder


def bitsandbytes_works() -> bool:
    """8-bit AdamW needs bitsandbytes with kernels for this GPU; try one tiny optimizer step."""
    try:
        import bitsandbytes as bnb
        import torch

        p = torch.nn.Parameter(torch.ones(4096, device="cuda"))
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def bench_settings(cfg: dict):
    """Settings for `train()` that do exactly the work of the bare loop plus the loop's own bookkeeping."""
    from comfyui_dreambooth.training.data.settings import DataSettings
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    full = cfg["mode"] == "full"
    return DreamBoothSettings(
        use_lora=not full, lora_rank=16, lora_alpha=16.0, learning_rate=1e-5 if full else 1e-4,
        optimizer=cfg.get("optimizer", "AdamW"), lr_scheduler="constant", max_grad_norm=0.0, use_ema=False,
        steps_per_image=0, max_train_steps=cfg["warmup"] + cfg["steps"], batch_size=1, text_encoder_ratio=0.0,
        mixed_precision=cfg.get("precision", "no"), gradient_checkpointing=cfg.get("checkpointing", False),
        save_every_epochs=0, preview_every_epochs=0, keep_last_checkpoints=1, run_name="bench",
        data=DataSettings(resolution=cfg["resolution"], bucket_min_side=64, bucket_max_side=max(128, cfg["resolution"])))


# ----------------------------------------------------------------------------------------------------------------
# The bare loop
# ----------------------------------------------------------------------------------------------------------------
class BareLoop:
    """noise + UNet forward/backward + optimizer step on cached inputs, on the trainer's own kind of model."""

    def __init__(self, model, settings, device):
        import torch

        from comfyui_dreambooth.training.models.text import encode_prompts
        from comfyui_dreambooth.training.setup.noise import build_noise_scheduler
        from comfyui_dreambooth.training.setup.optimizers import build_optimizer, training_param_groups
        from comfyui_dreambooth.training.setup.trainable import build_trainable, set_attention

        self.device = device
        self.settings = settings
        tm, unet_params, te_params = build_trainable(model, settings)
        self.unet = tm.unet.to(device)
        mp = settings.mixed_precision if device.type != "cpu" else "no"
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp)
        if self.dtype is not None:                          # as the trainer: frozen weights in half precision
            for p in self.unet.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(self.dtype)
        set_attention(self.unet, settings.attention)
        if settings.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.optimizer = build_optimizer(training_param_groups(unet_params, te_params, settings), settings)
        self.scaler = torch.amp.GradScaler("cuda") if mp == "fp16" else None
        self.scheduler = build_noise_scheduler(settings, model.prediction_type)
        side = settings.data.resolution // model.vae_scale_factor
        gen = torch.Generator("cpu").manual_seed(0)
        self.latents = torch.randn((1, 4, side, side), generator=gen).to(device)
        with torch.no_grad():
            model.text_encoders[0].to(device)
            self.embeds = encode_prompts(model, [PROMPT]).embeds.to(device)
        self.generator = torch.Generator(device).manual_seed(1)

    def step(self):
        import torch
        import torch.nn.functional as F

        noise = torch.randn(self.latents.shape, generator=self.generator, device=self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (1,), generator=self.generator,
                          device=self.device)
        noisy = self.scheduler.add_noise(self.latents, noise, t)
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        with ctx:
            pred = self.unet(noisy, t, self.embeds).sample
        loss = F.mse_loss(pred.float(), noise.float())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------------
# One configuration, in its own process
# ----------------------------------------------------------------------------------------------------------------
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0     # Linux: KiB


def _stats(times: list[float]) -> dict:
    return {"mean_ms": 1000 * statistics.fmean(times), "median_ms": 1000 * statistics.median(times),
            "min_ms": 1000 * min(times), "n": len(times)}


def run_worker(cfg: dict) -> dict:
    """what = interleaved | trainer | bare. Returns the measurements as a dict."""
    work = tempfile.mkdtemp(prefix="bench_train_step_")
    try:
        return _measure_in(work, cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)        # a full SD1.5 run leaves GBs of checkpoints


def _measure_in(work: str, cfg: dict) -> dict:
    import torch

    from comfyui_dreambooth.training.data.settings import ConceptSettings
    from comfyui_dreambooth.training.trainer import TrainCallbacks, train

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    model = build_model(cfg["model"])
    settings = bench_settings(cfg)
    concept = ConceptSettings(instance_dir=make_images(os.path.join(work, "images"), 4, cfg["resolution"]),
                              instance_prompt=PROMPT)
    warmup, what = cfg["warmup"], cfg["what"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = {"what": what}

    if what == "bare":
        # alone, the bare loop runs unsynchronised (a GPU queues step after step); one sync ends the block
        bare = BareLoop(model, settings, device)
        for _ in range(warmup):
            bare.step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(cfg["steps"]):
            bare.step()
        _sync(device)
        block = (time.perf_counter() - t0) / cfg["steps"]
        out["bare"] = {"mean_ms": 1000 * block, "median_ms": 1000 * block, "min_ms": 1000 * block,
                       "n": cfg["steps"]}
    else:
        bare = BareLoop(model, settings, device) if what == "interleaved" else None
        trainer_times, bare_times = [], []
        mark = {"end": None}

        def progress(p):
            _sync(device)
            now = time.perf_counter()
            if mark["end"] is not None and p["step"] > warmup:
                trainer_times.append(now - mark["end"])
            if bare is not None:
                t0 = time.perf_counter()
                bare.step()
                _sync(device)
                if p["step"] > warmup:
                    bare_times.append(time.perf_counter() - t0)
            mark["end"] = time.perf_counter()

        with torch.inference_mode(False):
            train(model, [concept], settings, output_root=os.path.join(work, "out"), resume="new", device=device,
                  callbacks=TrainCallbacks(progress=progress), reuse_finished=False)
        out["trainer"] = _stats(trainer_times)
        if bare_times:
            out["bare"] = _stats(bare_times)
    out["peak_rss_mb"] = _peak_rss_mb()
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        out["gpu"] = torch.cuda.get_device_name()
    out["torch_threads"] = torch.get_num_threads()
    return out


def _spawn(cfg: dict) -> dict:
    """Run one worker in a fresh process (own peak RSS / CUDA peak) and parse its JSON line."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                          capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"benchmark worker {cfg['what']} {cfg['model']} {cfg['mode']} failed "
                       f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def measure(cfg: dict, separate: bool) -> dict:
    row = dict(cfg)
    inter = _spawn({**cfg, "what": "interleaved"})
    t, b = inter["trainer"], inter["bare"]
    row.update(trainer=t, bare=b, ratio_mean=t["mean_ms"] / b["mean_ms"], ratio_median=t["median_ms"] / b["median_ms"],
               it_per_s_trainer=1000.0 / t["mean_ms"], it_per_s_bare=1000.0 / b["mean_ms"],
               peak_rss_mb_interleaved=inter["peak_rss_mb"], gpu=inter.get("gpu"))
    if separate:
        alone_t, alone_b = _spawn({**cfg, "what": "trainer"}), _spawn({**cfg, "what": "bare"})
        row.update(trainer_alone=alone_t["trainer"], bare_alone=alone_b["bare"],
                   ratio_alone=alone_t["trainer"]["mean_ms"] / alone_b["bare"]["mean_ms"],
                   peak_rss_mb_trainer=alone_t["peak_rss_mb"], peak_rss_mb_bare=alone_b["peak_rss_mb"],
                   cuda_max_allocated_mb_trainer=alone_t.get("cuda_max_allocated_mb"),
                   cuda_max_allocated_mb_bare=alone_b.get("cuda_max_allocated_mb"))
    return row


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def _fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    cuda = any(r["device"] == "cuda" for r in rows)
    head = (f"{'model':6} {'mode':5} {'res':>4} {'trainer ms':>11} {'bare ms':>9} {'ratio':>6} {'(median)':>8} "
            f"{'alone':>6} {'it/s':>6} {'RSS trainer':>12} {'RSS bare':>9}" + (f" {'CUDA trainer':>13} {'CUDA bare':>10}" if cuda else ""))
    print(head)
    print("-" * len(head))
    for r in rows:
        line = (f"{r['model']:6} {r['mode']:5} {r['resolution']:>4} {r['trainer']['mean_ms']:>11.1f} "
                f"{r['bare']['mean_ms']:>9.1f} {r['ratio_mean']:>6.3f} {r['ratio_median']:>8.3f} "
                f"{_fmt(r.get('ratio_alone'), '.3f'):>6} {r['it_per_s_trainer']:>6.2f} {_fmt(r.get('peak_rss_mb_trainer')):>10} MB "
                f"{_fmt(r.get('peak_rss_mb_bare')):>6} MB")
        if cuda:
            line += (f" {_fmt(r.get('cuda_max_allocated_mb_trainer')):>10} MB "
                     f"{_fmt(r.get('cuda_max_allocated_mb_bare')):>7} MB")
        print(line)
    print("ratio = mean trainer step / mean bare step, interleaved step by step in one process (target <= 1.05); "
          "alone = trainer alone / bare loop alone (unsynchronised block), each in a fresh process; "
          "RSS / CUDA = peak of the trainer alone and of the bare loop alone")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small", help="CPU models: tiny, small (comma-separated)")
    parser.add_argument("--modes", default="lora,full", help="lora, full (comma-separated)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default per model)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps not measured (default per model)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--sd15", action="store_true", help="CUDA: SD1.5-size random UNet at 512x512, batch 1")
    parser.add_argument("--device", default=None, help="device for --sd15 (default cuda)")
    parser.add_argument("--resolution", type=int, default=512, help="--sd15 image size (smaller for a smoke run)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "no"), help="--sd15 mixed precision")
    parser.add_argument("--no-separate", action="store_true", help="skip the trainer-alone / bare-alone memory runs")
    parser.add_argument("--json", default=None, help="where to write the results (default bench/results/...)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    configs = []
    if args.sd15:
        device = args.device or "cuda"
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print("--sd15 needs a CUDA GPU (or pass --device cpu --resolution 64 for a smoke run)")
                return 2
        eight_bit = device == "cuda" and bitsandbytes_works()
        warm, steps = DEFAULT_STEPS["sd15"]
        common = dict(model="sd15", device=device, resolution=args.resolution, precision=args.precision,
                      warmup=args.warmup if args.warmup is not None else warm, steps=args.steps or steps,
                      threads=args.threads)
        modes = args.modes.split(",")
        if "lora" in modes:
            configs.append({**common, "mode": "lora", "checkpointing": False, "optimizer": "AdamW"})
        if "full" in modes:
            configs.append({**common, "mode": "full", "checkpointing": True,
                            "optimizer": "AdamW8bit" if eight_bit else "AdamW"})
        if not eight_bit and device == "cuda":
            print("bitsandbytes 8-bit AdamW is not usable here; full fine-tune uses AdamW")
    else:
        for name in args.models.split(","):
            warm, steps = DEFAULT_STEPS[name]
            for mode in args.modes.split(","):
                configs.append(dict(model=name, mode=mode, device="cpu", resolution=CPU_MODELS[name]["resolution"],
                                    precision="no", checkpointing=False, optimizer="AdamW", threads=args.threads,
                                    warmup=args.warmup if args.warmup is not None else warm,
                                    steps=args.steps or steps))

    rows = []
    for cfg in configs:
        print(f"... {cfg['model']} {cfg['mode']} on {cfg['device']} ({cfg['warmup']} + {cfg['steps']} steps)",
              flush=True)
        rows.append(measure(cfg, separate=not args.no_separate))
    print()
    print_table(rows)

    import torch

    result = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpu_count": os.cpu_count(),
              "python": platform.python_version(), "torch": torch.__version__, "rows": rows}
    path = args.json or os.path.join(HERE, "results", f"train_step-{configs[0]['device']}-"
                                                      f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
