"""Where a CPU training run's resident memory goes, phase by phase (issue 21.4).

    python bench/rss_probe.py --model mid --preset default     # full fine-tune, AdamW, fp32 weights, clip 1
    python bench/rss_probe.py --model mid --preset lowmem      # bf16 + Adafactor + bf16 weights + fused, clip 0

Runs one combination of bench/memory.py (same model, settings and data; in this process, so run it once per
process) while a thread samples VmRSS every millisecond. The pack's phases are marked by wrapping its functions
(data preparation, building, each step's forward / backward / optimizer step / zero_grad, the final save, the
result); per phase it reports the largest RSS sampled, and at each phase's end the RSS, the bytes of live tensors
(every storage reachable from Python, counted once) and glibc's malloc statistics (mallinfo2: bytes in use, free
bytes kept in the arenas, bytes in mmap'd chunks). RSS minus live tensors is what the tensors do not explain:
the interpreter and libraries, and what the allocator keeps. Prints one JSON line (RESULT ...) at the end.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import os
import resource
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

PRESETS = {
    "default": dict(mode="full", fused_backward=False, weights_dtype="fp32", optimizer="AdamW", frozen_dtype="auto"),
    "lowmem": dict(mode="full", fused_backward=True, weights_dtype="bf16", optimizer="Adafactor", frozen_dtype="auto"),
}
MIB = 2 ** 20


def vm_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]


def mallinfo() -> dict:
    """glibc's counters (main arena + the others): in use, free but kept, mmap'd (bytes)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        m = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"in_use": m.uordblks + m.hblkhd, "free_kept": m.fordblks, "mmapped": m.hblkhd, "arena": m.arena}


def live_tensor_bytes() -> int:
    import torch

    seen, total = set(), 0
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and not o.is_meta and o.device.type == "cpu":
                s = o.untyped_storage()
                if s.data_ptr() not in seen:
                    seen.add(s.data_ptr())
                    total += s.nbytes()
        except Exception:       # noqa: BLE001 (fake / odd tensors)
            pass
    return total


class Probe:
    def __init__(self, every_s: float = 0.001):
        self.phase, self.peaks, self.ends, self.order = "start", {}, [], []
        self.every_s, self.stop = every_s, threading.Event()
        self.main, self.where = threading.get_ident(), {}
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self.stop.is_set():
            self.note()
            time.sleep(self.every_s)

    def note(self):
        r, p = vm_rss(), self.phase
        if r > self.peaks.get(p, 0):
            self.peaks[p] = r
            if threading.get_ident() != self.main:
                frame = sys._current_frames().get(self.main)     # the main thread's stack at a new peak
                stack = []
                while frame is not None and len(stack) < 6:
                    if "site-packages" not in frame.f_code.co_filename or len(stack) < 2:
                        stack.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno} "
                                     f"{frame.f_code.co_name}")
                    frame = frame.f_back
                self.where[p] = {"rss_mib": r / MIB, "stack": stack}

    def enter(self, name):
        self.note()
        prev, self.phase = self.phase, name
        if name not in self.order:
            self.order.append(name)
        self.note()
        return prev

    def leave(self, name, prev, detail: bool):
        self.note()
        row = {"phase": name, "rss_mib": vm_rss() / MIB}
        if detail:
            row["tensors_mib"] = live_tensor_bytes() / MIB
            row |= {k: v / MIB for k, v in mallinfo().items()}
        self.ends.append(row)
        self.phase = prev

    def wrap(self, owner, attr, name, detail=True):
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def wrapped(*a, **k):
            prev = self.enter(name)
            try:
                return fn(*a, **k)
            finally:
                self.leave(name, prev, detail)
        setattr(owner, attr, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mid")
    ap.add_argument("--preset", choices=tuple(PRESETS), required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", default=None, help="warm-up,measured (default bench/memory.py's)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import memory as bench
    from comfyui_dreambooth.training import checkpoints, loop, trainer
    from comfyui_dreambooth.training.data.settings import ConceptSettings

    if args.steps:
        bench.STEPS[args.model] = tuple(int(x) for x in args.steps.split(","))
    probe = Probe()
    probe.thread.start()
    probe.enter("build the model")
    model = bench.build_model(args.model)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("unet", model.unet), ("vae", model.vae), *((f"te{i}", te) for i, te in enumerate(model.text_encoders)))}
    settings = bench.settings_for(dict(PRESETS[args.preset]), args.model, "cpu")
    for owner, attr in ((trainer, "_start"), (trainer, "_prepare_data"), (trainer, "build_training"),
                        (trainer, "_resume_or_create_run"), (trainer, "finish_model"), (checkpoints, "write_state")):
        probe.wrap(owner, attr, attr.strip("_"))
    step_no = [0]
    train_step = loop.train_step

    def probed_step(job, step, *a, **k):
        step_no[0] = step + 1
        if not getattr(job, "_probed", False):
            job._probed = True
            probe.wrap(job.accelerator, "backward", "backward", detail=False)
            for attr in ("step", "zero_grad"):
                probe.wrap(job.optimizer, attr, f"optimizer.{attr}", detail=False)
        prev = probe.enter(f"step {step + 1}")
        try:
            return train_step(job, step, *a, **k)
        finally:
            probe.leave(f"step {step + 1}", prev, detail=True)
    loop.train_step = probed_step
    mbl = loop.micro_batch_loss

    def probed_forward(*a, **k):
        prev = probe.enter(f"step {step_no[0]} forward")
        try:
            return mbl(*a, **k)
        finally:
            probe.leave(f"step {step_no[0]} forward", prev, detail=False)
    loop.micro_batch_loss = probed_forward

    import tempfile

    import numpy as np
    from PIL import Image

    res = bench.RESOLUTION[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "instance")
        os.makedirs(folder)
        rng = np.random.default_rng(0)
        for i in range(2):
            Image.fromarray((rng.random((res, res, 3)) * 255).astype("uint8")).save(os.path.join(folder, f"{i}.png"))
        concept = ConceptSettings(instance_dir=folder, instance_prompt="a photo of sks dog",
                                  class_prompt="a photo of dog", num_class_images_per_image=0)
        probe.leave("build the model", "train", detail=True)
        trainer.train(model, [concept], settings, output_root=tmp, device="cpu")
    probe.enter("end")
    probe.stop.set()
    probe.thread.join()
    out = {"model": args.model, "preset": args.preset, "params": counts,
           "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "phase_peak_mib": {p: probe.peaks[p] / MIB for p in probe.order if p in probe.peaks},
           "phase_end": probe.ends, "where": probe.where}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
