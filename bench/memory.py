"""Benchmark: peak memory (and speed) of training per memory-engine setting combination (issue 11).

    python bench/memory.py --quick                       # CPU dry run: tiny model, a few combinations (~2 min)
    python bench/memory.py                               # CPU: tiny + mid model, LoRA + full, every combination
    python bench/memory.py --models tiny                 # CPU: only the tiny model
    python bench/memory.py --device cuda                 # GPU: SD1.5-size @512 and SDXL-size @1024, batch 1

Each combination trains in a fresh subprocess (`train()` with previews / checkpoints off), so its peak is its own:
CPU reports the peak RSS (`ru_maxrss`), CUDA `torch.cuda.max_memory_allocated` (and reserved); both report it/s
over the measured steps (after warm-up), and the estimator's total for the same settings (training/memory.py; on
CUDA with its error against max_allocated, the check of issue 12).

Models. CPU: `tiny` (the test model, 64 px) and `mid` (training.models.tiny.build_random_sd15(unet="reduced"):
an SD1.5-layout UNet of two levels at 320/640 channels (~100M) with the real-size SD VAE (84M) and CLIP-L (123M),
~300M parameters in all, at 64 px). CUDA: `sd15` (SD1.5's UNet, VAE and CLIP-L, random init, 512 px) and `sdxl`
(SDXL's UNet layout with CLIP-L + a bigG-size text encoder, random init, 1024 px; the VAE is the SD VAE, which has
SDXL's architecture).

Combinations. CPU: every (mode in lora/full) x fused_backward x weights_dtype x optimizer in (AdamW, Adafactor)
x frozen_dtype in (auto, fp8 for LoRA). CUDA: the four presets of the issue:
  lora-default   LoRA rank 16, AdamW, bf16 mixed precision, gradient checkpointing
  lora-lowmem    + fused_backward, Adafactor (AdamW8bit when bitsandbytes works), frozen_dtype fp8
  full-default   full fine-tune, AdamW, bf16 mixed precision, gradient checkpointing, fp32 master weights
  full-lowmem    + fused_backward, weights_dtype bf16, Adafactor (or AdamW8bit)
In every case latents and text embeddings are cached, so the VAE and text encoders leave the GPU.

Results: a table on stdout and JSON in bench/results/memory-<device>-<time>.json (or --json PATH).

    python bench/memory.py --accounting                  # full size, no GPU: the targets' table (issue 21)
    python bench/memory.py --accounting --matrix         # + checkpointing off, batch 2 / 4, 768 / 1024 px

--accounting runs `comfyui-dreambooth estimate FAMILY --measure --json` (training/memory_measure.py: one real
training step at full size on fake tensors) per family (sd15 @ 512, sd2 @ 768, sdxl @ 1024) for the settings
the wizard picks for the issue's targets (SD1.5 LoRA 3 GiB / full 5 GiB, SDXL LoRA 5 / full 8; SD2 as SD1.5)
and for the defaults (LoRA / full, AdamW, bf16, gradient checkpointing), each in its own process, and prints the
accounted peak per part beside the estimator's parts.

    python bench/memory.py --grid                        # the estimator against the accounting, per part (21.3)
    python bench/memory.py --table                       # the same table from the cache only (seconds)

--grid accounts the rows of grid_rows() not yet in bench/results/memory-grid.json (SD1.5 / SD2 / SDXL, LoRA / full,
checkpointing on / off, batch 1 / 2 / 4, 512 / 768 / 1024 px, the low-memory settings; each in its own process),
then prints per row the accounted and estimated totals and the ratio estimate / accounting per part (markdown).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))   # the folder holding the comfyui_dreambooth package
sys.path.insert(0, HERE)
from bench_train_step import bitsandbytes_works  # noqa: E402  (one 8-bit probe for both benchmarks)

RESOLUTION = {"tiny": 64, "mid": 64, "mid316": 64, "sd15": 512, "sdxl": 1024}
STEPS = {"tiny": (2, 6), "mid": (1, 3), "mid316": (1, 3), "sd15": (3, 10), "sdxl": (3, 8)}        # (warm-up, measured)


# ---- models -----------------------------------------------------------------------------------------------------
def build_model(name: str):
    from comfyui_dreambooth.training.models import build_tiny_model
    from comfyui_dreambooth.training.models.tiny import build_random_sd15

    if name == "tiny":
        return build_tiny_model("sd1")
    if name == "mid":
        return build_random_sd15(unet="reduced")
    if name == "mid316":          # --models mid316: a ~316M UNet (three levels), the issue 21.4 proxy
        return build_random_sd15(unet="three_levels")
    if name == "sd15":
        return build_random_sd15(unet="full")
    if name == "sdxl":
        return build_random_sdxl()
    raise ValueError(f"unknown model {name!r}")


def build_random_sdxl():
    """SDXL's UNet (2.6B), CLIP-L + a bigG-size text encoder, the SD VAE architecture; random init."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from comfyui_dreambooth.training.models import build_tiny_model
    from comfyui_dreambooth.training.models.tiny import VOCAB, sd15_text_encoder, sd15_vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280), layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    big_g = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=0))
    vae = sd15_vae()
    vae.register_to_config(scaling_factor=0.13025)
    for m in (unet, big_g, vae):
        m.eval().requires_grad_(False)
    te1 = sd15_text_encoder().eval().requires_grad_(False)
    return build_tiny_model("sdxl").replace(unet=unet, vae=vae, text_encoders=[te1, big_g],
                                            source_hash="random-sdxl-0")


# ---- combinations -----------------------------------------------------------------------------------------------
def cpu_combinations(quick: bool) -> list[dict]:
    out = []
    for mode, fused, wdt, opt, frozen in itertools.product(("lora", "full"), (False, True), ("fp32", "bf16"),
                                                           ("AdamW", "Adafactor"), ("auto", "fp8")):
        if frozen == "fp8" and mode == "full":
            continue
        out.append(dict(mode=mode, fused_backward=fused, weights_dtype=wdt, optimizer=opt, frozen_dtype=frozen))
    if quick:
        out = [c for c in out if c["optimizer"] == "AdamW" and c["frozen_dtype"] == "auto"
               and c["fused_backward"] == (c["weights_dtype"] == "bf16")]
    return out


def gpu_combinations() -> list[dict]:
    low_opt = "AdamW8bit" if bitsandbytes_works() else "Adafactor"
    return [
        dict(name="lora-default", mode="lora", optimizer="AdamW"),
        dict(name="lora-lowmem", mode="lora", optimizer=low_opt, fused_backward=True, frozen_dtype="fp8"),
        dict(name="full-default", mode="full", optimizer="AdamW"),
        dict(name="full-lowmem", mode="full", optimizer=low_opt, fused_backward=True, weights_dtype="bf16"),
    ]


def settings_for(cfg: dict, model_name: str, device: str):
    from comfyui_dreambooth.training.data.settings import DataSettings
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    full = cfg["mode"] == "full"
    warm, steps = STEPS[model_name]
    bf16 = cfg.get("weights_dtype") == "bf16" or device == "cuda"
    fused = cfg.get("fused_backward", False)
    res = RESOLUTION[model_name]
    return DreamBoothSettings(
        use_lora=not full, lora_rank=16, lora_alpha=16.0, learning_rate=1e-5 if full else 1e-4,
        optimizer=cfg.get("optimizer", "AdamW"), fused_backward=fused, weights_dtype=cfg.get("weights_dtype", "fp32"),
        frozen_dtype=cfg.get("frozen_dtype", "auto"), max_grad_norm=0.0 if fused else 1.0,
        lr_scheduler="constant", use_ema=False, steps_per_image=0, max_train_steps=warm + steps, batch_size=1,
        text_encoder_ratio=0.0, mixed_precision="bf16" if bf16 else "no", gradient_checkpointing=device == "cuda",
        save_every_epochs=0, preview_every_epochs=0, keep_last_checkpoints=1, run_name="bench-memory",
        data=DataSettings(resolution=res, bucket_min_side=64, bucket_max_side=max(128, res)))


# ---- one combination, in a child process ----------------------------------------------------------------------
def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from comfyui_dreambooth.training.data.settings import ConceptSettings
    from comfyui_dreambooth.training.trainer import TrainCallbacks, train

    cfg = json.loads(args.child)
    model_name, device = cfg.pop("model"), cfg.pop("device")
    model = build_model(model_name)
    settings = settings_for(cfg, model_name, device)
    warm, steps = STEPS[model_name]
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "instance")
        os.makedirs(folder)
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        for i in range(2):
            Image.fromarray((rng.random((RESOLUTION[model_name],) * 2 + (3,)) * 255).astype("uint8")).save(
                os.path.join(folder, f"{i}.png"))
        concept = ConceptSettings(instance_dir=folder, instance_prompt="a photo of sks dog",
                                  class_prompt="a photo of dog", num_class_images_per_image=0)
        times = {}

        def progress(p):
            times[p["step"]] = time.perf_counter()
            if device == "cuda" and p["step"] == 1:
                torch.cuda.reset_peak_memory_stats()   # data preparation (VAE / text encoding) is not training

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        result = train(model, [concept], settings, output_root=tmp, device=device,
                       callbacks=TrainCallbacks(progress=progress))
        losses = []
        with open(os.path.join(result.run_dir, "loss.jsonl"), encoding="utf-8") as f:
            losses = [json.loads(line)["loss"] for line in f if line.strip()]
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "it_per_s": (steps / (times[warm + steps] - times[warm])) if warm + steps in times and warm in times
           else None, "losses": losses}
    if device == "cuda":
        out["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        out["max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
    # the estimator's answer for the same settings (issue 12: within 15 % of max_allocated on a GPU)
    from comfyui_dreambooth.training.memory import estimate

    est = estimate(model, settings.resolved([concept]), resolution=RESOLUTION[model_name], batch=1)
    out["estimate_gib"] = est.total / 2 ** 30
    out["estimate_parts_gib"] = {k: v / 2 ** 30 for k, v in est.parts.items()}
    if "max_allocated_gib" in out:
        out["estimate_error"] = out["estimate_gib"] / out["max_allocated_gib"] - 1
    print("RESULT " + json.dumps(out))


def run_one(cfg: dict, model_name: str, device: str, threads: int, timeout: int) -> dict:
    payload = json.dumps({**cfg, "model": model_name, "device": device})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.time()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", payload, "--threads", str(threads)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    row = {"model": model_name, "device": device, **cfg, "wall_s": round(time.time() - started, 1)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return row
    row.update(json.loads(lines[-1][len("RESULT "):]))
    return row


def label(cfg: dict) -> str:
    if "name" in cfg:
        return cfg["name"]
    return (f"{cfg['mode']:4s} fused={'y' if cfg.get('fused_backward') else 'n'} w={cfg.get('weights_dtype', 'fp32')} "
            f"{cfg.get('optimizer', 'AdamW'):9s} frozen={cfg.get('frozen_dtype', 'auto')}")


# ---- the accounting of one real step at full size (no GPU) -------------------------------------------------------
TARGETS_GIB = {("sd15", "lora"): 3, ("sd15", "full"): 5, ("sd2", "lora"): 3, ("sd2", "full"): 5,
               ("sdxl", "lora"): 5, ("sdxl", "full"): 8}
FAMILY_RES = {"sd15": 512, "sd2": 768, "sdxl": 1024}
DEFAULTS = {"lora": {"use_lora": True, "optimizer": "AdamW", "mixed_precision": "bf16", "text_encoder_ratio": 0,
                     "gradient_checkpointing": True},
            "full": {"use_lora": False, "optimizer": "AdamW", "mixed_precision": "bf16", "text_encoder_ratio": 0,
                     "gradient_checkpointing": True}}


def accounting_rows(families, matrix: bool) -> list[tuple[str, str, str, dict]]:
    """(family, mode, preset name, settings to --set) for the table."""
    from comfyui_dreambooth.training.wizard import WIZARD_SETTINGS, choose_settings

    rows = []
    for fam in families:
        for mode in ("lora", "full"):
            res = FAMILY_RES[fam]
            picked = choose_settings(fam, TARGETS_GIB[(fam, mode)], images=10, resolution=res, mode=mode).settings
            wizard = {k: getattr(picked, k) for k in WIZARD_SETTINGS} | {"resolution": res}
            base = DEFAULTS[mode] | {"resolution": res}
            rows += [(fam, mode, f"wizard {TARGETS_GIB[(fam, mode)]} GiB", wizard), (fam, mode, "default", base)]
            if matrix:
                rows += [(fam, mode, "default, no checkpointing", base | {"gradient_checkpointing": False})]
                rows += [(fam, mode, f"default, batch {b}", base | {"batch_size": b}) for b in (2, 4)]
                rows += [(fam, mode, f"default, {r} px", base | {"resolution": r}) for r in (512, 768, 1024)
                         if r != res]
    return rows


def run_accounting(family: str, overrides: dict, timeout: int) -> dict:
    cli = os.path.join(os.path.dirname(sys.executable), "comfyui-dreambooth")
    cmd = [cli if os.path.exists(cli) else "comfyui-dreambooth", "estimate", family, "--measure", "--json"]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    start = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1], "wall_s": round(time.monotonic() - start)}
    return json.loads(p.stdout) | {"wall_s": round(time.monotonic() - start)}


def accounting_main(args) -> None:
    families = (args.models or "sd15,sd2,sdxl").split(",")
    out = []
    for fam, mode, name, overrides in accounting_rows(families, args.matrix):
        r = run_accounting(fam, overrides, args.timeout)
        out.append({"family": fam, "mode": mode, "preset": name, "settings": overrides} | r)
        if "error" in r:
            print(f"{fam:5s} {mode:4s} {name:28s} ERROR {r['error']}", flush=True)
            continue
        m, e = r["measured_gb"], r["estimate_gb"]
        parts = " ".join(f"{k[:4]} {m[k]:.2f}" for k in ("weights", "gradients", "optimizer", "activations",
                                                          "temporaries") if m.get(k))
        target = TARGETS_GIB[(fam, mode)]
        verdict = "meets" if m["total"] <= target else "MISSES"
        print(f"{fam:5s} {mode:4s} {name:28s} peak {m['total']:6.2f} GiB ({verdict} {target}) [{parts}] at "
              f"{r['measured_peak_at']}; estimate {e['total']:.2f} (less overhead "
              f"{e['total'] - e['overhead']:.2f}) ({r['wall_s']} s)", flush=True)
    path = args.json or os.path.join(HERE, "results", f"memory-accounting-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"measured_by": "fake tensors, CPU kernels", "platform": platform.platform(), "rows": out}, f,
                  indent=2)
    print(f"wrote {path}")


# ---- the estimator against the accounting, per part, over a grid of configurations (issue 21.3) -------------------
GRID_JSON = os.path.join(HERE, "results", "memory-grid.json")
LOWMEM = {"lora": {"optimizer": "Adafactor", "fused_backward": True, "max_grad_norm": 0.0, "weights_dtype": "bf16",
                   "frozen_dtype": "fp8"},
          "full": {"optimizer": "Adafactor", "fused_backward": True, "max_grad_norm": 0.0, "weights_dtype": "bf16"}}


def grid_rows() -> list[tuple[str, dict]]:
    """(family, settings) of the grid: per family at its own resolution LoRA / full x checkpointing on / off at
    batch 1 (SDXL: full with checkpointing only); batch 2 / 4, 768 / 1024 px and the low-memory settings on
    SD1.5 (SD2 and SDXL: batch 2, another resolution). Settings are explicit (not the wizard's picks, which follow
    the estimator), so a cached row stays the same configuration. Full-size accountings take 0.5-10 min each on two
    shared cores: the grid is chosen to hold every axis of issue 21.3 without its full product."""
    lora, full = DEFAULTS["lora"], DEFAULTS["full"]
    rows = []
    for fam in ("sd15", "sd2", "sdxl"):
        res = {"resolution": FAMILY_RES[fam]}
        for mode in ("lora", "full"):
            for gc in (True, False):
                if not (fam == "sdxl" and mode == "full" and not gc):
                    rows.append((fam, DEFAULTS[mode] | res | {"gradient_checkpointing": gc}))
        if fam == "sd15":
            rows += [(fam, lora | res | {"batch_size": 4, "gradient_checkpointing": gc}) for gc in (True, False)]
            rows += [(fam, full | res | {"batch_size": 2}), (fam, lora | res | LOWMEM["lora"]),
                     (fam, full | res | LOWMEM["full"])]
            rows += [(fam, lora | {"resolution": 1024, "gradient_checkpointing": gc}) for gc in (True, False)]
            rows += [(fam, lora | {"resolution": 768})]
        elif fam == "sd2":
            rows += [(fam, lora | res | {"batch_size": 2}), (fam, lora | {"resolution": 512})]
        else:
            rows += [(fam, lora | res | {"batch_size": 2}), (fam, lora | res | LOWMEM["lora"] | {"lora_rank": 4})]
    return rows


def grid_key(family: str, settings: dict) -> str:
    return family + " " + json.dumps(settings, sort_keys=True)


def grid_child(payload: str) -> None:
    """One row of the grid: the accounting (training/memory_measure.py) with everything it reports, as JSON."""
    import torch

    torch.set_num_threads(1)
    from comfyui_dreambooth.cli import apply_setting_overrides
    from comfyui_dreambooth.training.memory_measure import measure
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    row = json.loads(payload)
    s = apply_setting_overrides(DreamBoothSettings(), [f"{k}={json.dumps(v)}" for k, v in row["settings"].items()])
    m = measure(row["family"], s)
    print("RESULT " + json.dumps({"parts": m.parts, "peak_at": m.peak_at, "stages": m.stages,
                                  "each_peak": m.each_peak, "held": m.held, "resident": m.resident, "host": m.host,
                                  "notes": m.notes, "seconds": round(m.seconds, 1)}))


def grid_main(args) -> None:
    """Accounts the grid's rows not yet in the cache (GRID_JSON), one process at a time, then prints the table."""
    path = args.json or GRID_JSON
    cache = json.load(open(path, encoding="utf-8")) if os.path.exists(path) else {"rows": {}}
    todo = [(f, s) for f, s in grid_rows() if grid_key(f, s) not in cache["rows"]]
    if args.models:
        todo = [(f, s) for f, s in todo if f in args.models.split(",")]
    for fam, settings in todo if args.grid else []:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--grid-child",
                            json.dumps({"family": fam, "settings": settings})],
                           capture_output=True, text=True, env=env, timeout=args.timeout)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not lines:
            print(f"{fam} {settings}: ERROR {(p.stderr.strip().splitlines() or ['no output'])[-1]}", flush=True)
            continue
        if os.path.exists(path):      # rows another run wrote meanwhile are kept
            cache["rows"] = json.load(open(path, encoding="utf-8"))["rows"] | cache["rows"]
        cache["rows"][grid_key(fam, settings)] = {"family": fam, "settings": settings,
                                                  **json.loads(lines[-1][len("RESULT "):])}
        cache |= {"measured_by": "fake tensors, CPU kernels", "platform": platform.platform()}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cache, f, indent=1)
        r = cache["rows"][grid_key(fam, settings)]
        print(f"accounted {fam} {settings}: {sum(r['parts'].values()) / 2 ** 30:.2f} GiB in {r['seconds']} s",
              flush=True)
    print_grid_table(cache)


GRID_PARTS = ("weights", "gradients", "optimizer", "activations", "temporaries")
SMALL_BYTES = 32 * 2 ** 20     # a part below this on both sides is compared in MB, not as a ratio


def grid_estimate(family: str, settings: dict) -> dict:
    """The estimator's parts for a grid row, on the accounting's kinds (bytes): autocast's and fp8's weight casts
    are activations there; text encoders, VAE (cached: 0) and the overhead (CUDA context) are left out."""
    from comfyui_dreambooth.cli import apply_setting_overrides
    from comfyui_dreambooth.training.memory import estimate
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    s = apply_setting_overrides(DreamBoothSettings(), [f"{k}={json.dumps(v)}" for k, v in settings.items()])
    p = estimate(family, s).parts
    out = {k: p[k] for k in ("weights", "gradients", "optimizer", "temporaries")}
    out["activations"] = p["activations"] + p["weight_casts"]
    out["total"] = sum(out.values())
    return out


def grid_ratio(est: int, acc: int) -> str:
    if max(est, acc) < SMALL_BYTES or not acc:
        return f"{est / 2 ** 20:.0f}/{acc / 2 ** 20:.0f}M"
    return f"{est / acc:.2f}"


def grid_label(family: str, settings: dict) -> str:
    s = settings
    bits = [family, "lora" if s.get("use_lora") else "full", f"{s.get('resolution')}px", f"b{s.get('batch_size', 1)}",
            "ckpt" if s.get("gradient_checkpointing") else "no-ckpt"]
    if s.get("fused_backward"):
        bits.append("lowmem")
    bits += [f"{k}={v}" for k, v in s.items() if k in ("lora_rank", "attention")]
    return " ".join(bits)


def print_grid_table(cache) -> None:
    """Per row of the cache: the accounted total (GiB) and the estimate / accounting ratio per part (a part below
    SMALL_BYTES on both sides as estimate/accounting MB); markdown."""
    head = ["row", "accounted GiB", "estimate GiB", *GRID_PARTS, "total"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in cache["rows"].values():
        acc = dict(row["parts"])
        acc["total"] = sum(acc[k] for k in GRID_PARTS) + acc.get("ema", 0)
        est = grid_estimate(row["family"], row["settings"])
        cells = [grid_label(row["family"], row["settings"]), f"{acc['total'] / 2 ** 30:.2f}",
                 f"{est['total'] / 2 ** 30:.2f}", *(grid_ratio(est[k], acc[k]) for k in (*GRID_PARTS, "total"))]
        print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--models", default=None, help="comma list (cpu: tiny,mid; cuda: sd15,sdxl)")
    ap.add_argument("--quick", action="store_true", help="CPU dry run: tiny model, 4 combinations")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per combination")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--accounting", action="store_true", help="full size on fake tensors, no GPU (issue 21)")
    ap.add_argument("--matrix", action="store_true", help="with --accounting: checkpointing off, batch, resolution")
    ap.add_argument("--grid", action="store_true", help="account the grid's missing rows (cached in "
                    "bench/results/memory-grid.json), then compare the estimate with the accounting per part")
    ap.add_argument("--table", action="store_true", help="the --grid table from the cache only (seconds)")
    ap.add_argument("--grid-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.grid_child:
        grid_child(args.grid_child)
        return
    if args.grid or args.table:
        grid_main(args)
        return
    if args.accounting:
        accounting_main(args)
        return
    if args.child:
        child(args)
        return
    if args.device == "cuda":
        models = (args.models or "sd15,sdxl").split(",")
        combos = gpu_combinations()
    else:
        models = (args.models or ("tiny" if args.quick else "tiny,mid")).split(",")
        combos = cpu_combinations(args.quick)
    rows = []
    for model_name in models:
        for cfg in combos:
            row = run_one(cfg, model_name, args.device, args.threads, args.timeout)
            rows.append(row)
            peak = (f"{row['max_allocated_gib']:.2f} GiB alloc" if "max_allocated_gib" in row
                    else f"{row['peak_rss_mib']:.0f} MiB RSS" if "peak_rss_mib" in row else row.get("error"))
            speed = f"{row['it_per_s']:.2f} it/s" if row.get("it_per_s") else ""
            est = (f"est {row['estimate_gib']:.2f} GiB" + (f" ({100 * row['estimate_error']:+.0f}%)"
                                                          if "estimate_error" in row else "")
                   if "estimate_gib" in row else "")
            print(f"{model_name:5s} {label(cfg):55s} {peak:>18s} {speed:>12s} {est:>20s}  ({row['wall_s']} s)",
                  flush=True)
    path = args.json or os.path.join(HERE, "results", f"memory-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"device": args.device, "platform": platform.platform(), "python": sys.version.split()[0],
                   "rows": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
