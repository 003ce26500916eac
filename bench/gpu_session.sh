#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one command that fits one device call (~9 min on an H200):
#   issue 11  peak memory and it/s of the four memory presets, SD1.5 size @512 and SDXL size @1024 (bench/memory.py)
#   issue 12  the estimator's error against torch.cuda.max_memory_allocated, same runs (target <= 15 %)
#   issue 14  our step vs the bare floor at SD1.5 size, and MFU at batch 8 bf16 (bench/run.py --parts step,mfu)
# Each part has its own time limit, so a slow one does not lose the others; results (JSON + log) go to $OUT.
#
#   DRY=1 bash bench/gpu_session.sh                  # CPU dry run at tiny sizes (a few minutes)
#   bash bench/gpu_session.sh                        # on the device machine: carry .whl (diffusers wheel)
#
# The device image has torch, transformers, peft and accelerate but no diffusers: its wheel (and importlib_metadata)
# travels in the git-ignored .whl/ folder, made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==<version> importlib_metadata
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-session-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import diffusers" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# this checkout importable as comfyui_dreambooth, whatever its folder is called
mkdir -p /tmp/gpu-session-pkg && ln -sfn "$PWD" /tmp/gpu-session-pkg/comfyui_dreambooth
export PYTHONPATH="/tmp/gpu-session-pkg${PYTHONPATH:+:$PYTHONPATH}"

part() {   # name, seconds, command...: run with a limit, log to $OUT/name.log, never stop the script
  local name="$1" limit="$2"; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

"$PY" - <<'EOF' 2>&1 | tee "$OUT/machine.log"
import torch, diffusers, transformers, peft, accelerate
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
      "diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      "accelerate", accelerate.__version__)
EOF

if [ "${DRY:-0}" = 1 ]; then
  part memory 600 "$PY" bench/memory.py --quick --json "$OUT/memory-cpu.json"
  part step-mfu 600 "$PY" bench/run.py --device cpu --quick --parts step,mfu --flops --models tiny --json "$OUT/run-cpu.json"
else
  part memory-sd15 200 "$PY" bench/memory.py --device cuda --models sd15 --timeout 120 --json "$OUT/memory-sd15.json"
  part memory-sdxl 210 "$PY" bench/memory.py --device cuda --models sdxl --timeout 150 --json "$OUT/memory-sdxl.json"
  part step-mfu 110 "$PY" bench/run.py --device cuda --parts step,mfu --json "$OUT/run-cuda.json"
fi
ls -la "$OUT"
