"""Peak memory of loading a checkpoint: are the weights held once (not copied) while loading?

    python bench/bench_load.py                 # tiny model
    python bench/bench_load.py --sd15          # full-size SD1.5 architecture with random weights (~2 GB fp16 file)

Each measurement runs in a fresh process: peak RSS (VmHWM) after loading and reading every weight once, minus
the RSS after imports, compared with the bytes of the weights in memory. Ratio ~1.0 means one copy; 2.0 would
mean a full extra copy at some point. (fp16 → fp32 holds the file's pages and the fp32 copy: ratio ~1.5.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, resource, sys, time
import torch, diffusers, transformers, safetensors, accelerate  # imports first: their memory is the baseline
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection
from comfyui_dreambooth.training.models import load_model
from comfyui_dreambooth.training.models.tokenizing import clip_tokenizer
clip_tokenizer(); clip_tokenizer("!")

def status_mb(field):
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent (which built the model)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

path, dtype = sys.argv[1], (sys.argv[2] if sys.argv[2] != "none" else None)
base = status_mb("VmRSS")
t = time.time()
model = load_model(path, dtype=dtype)
elapsed = time.time() - t
after_load = status_mb("VmHWM")
# safetensors tensors are memory-mapped: pages become resident when read. Read every weight once.
checksum = sum(float(p.float().sum()) for m in model.modules() for p in m.parameters())
weights = sum(p.numel() * p.element_size() for m in model.modules() for p in m.parameters()) / 2**20
peak = status_mb("VmHWM")
print(json.dumps({"baseline_mb": base, "after_load_mb": after_load, "peak_mb": peak, "weights_mb": weights,
                  "load_s": elapsed, "peak_over_baseline_mb": peak - base, "ratio": (peak - base) / weights}))
"""


def sd15_model():
    """SD1.5's real architecture (UNet 860M, VAE 84M, CLIP-L 123M), random weights."""
    from comfyui_dreambooth.training.models.tiny import build_random_sd15

    return build_random_sd15()


def measure(path: str, dtype: str | None) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, dtype or "none"], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd15", action="store_true", help="full-size SD1.5 architecture (random weights)")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "comfyui_dreambooth_bench"))
    args = ap.parse_args()
    from comfyui_dreambooth.training.models import build_tiny_model, save_single_file

    os.makedirs(args.dir, exist_ok=True)
    name = "sd15_random_fp16.safetensors" if args.sd15 else "tiny_sd1_fp16.safetensors"
    path = os.path.join(args.dir, name)
    if not os.path.exists(path):
        t = time.time()
        model = sd15_model() if args.sd15 else build_tiny_model("sd1")
        save_single_file(model, path, dtype="fp16")
        del model
        print(f"wrote {path} ({os.path.getsize(path) / 2**30:.2f} GiB) in {time.time() - t:.0f} s")
    rows = [("file dtype (fp16)", measure(path, None)), ("cast to fp32", measure(path, "fp32"))]
    print(f"\n{name}: {os.path.getsize(path) / 2**20:.0f} MiB on disk")
    print(f"{'load as':<20}{'weights MiB':>12}{'RSS after load':>16}{'peak-baseline MiB':>19}{'ratio':>7}{'load s':>8}")
    for label, r in rows:
        print(f"{label:<20}{r['weights_mb']:>12.0f}{r['after_load_mb'] - r['baseline_mb']:>16.0f}"
              f"{r['peak_over_baseline_mb']:>19.0f}{r['ratio']:>7.2f}{r['load_s']:>8.1f}")
    os.makedirs("bench/results", exist_ok=True)
    with open(os.path.join("bench/results", f"load_{'sd15' if args.sd15 else 'tiny'}.json"), "w") as f:
        json.dump(dict(rows), f, indent=2)


if __name__ == "__main__":
    main()
