"""Trainings and samplings run one after another in one process, as ComfyUI runs queued prompts.

    python long_lived_jobs.py MODELS_DIR OUT.json JOB [JOB ...]

Each job loads its model under torch.inference_mode() (as ComfyUI does), trains, samples, and records a hash of
the trained weights and of the images; after each job the process's live tensors and RSS are counted, so a
caller can compare one process running every job with a fresh process per job (tests/test_long_lived_process.py).
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import sys

JOBS = {
    # name: (model file stem, settings changes, interrupt after this many steps or None)
    "sd1_lora": ("tiny_sd1", dict(use_lora=True, mixed_precision="no"), None),
    "sd1_full_bf16": ("tiny_sd1", dict(use_lora=False, learning_rate=1e-4, mixed_precision="bf16"), None),
    "sd2_lora_te_interrupted": ("tiny_sd2", dict(use_lora=True, text_encoder_ratio=0.5, mixed_precision="bf16",
                                                 gradient_checkpointing=True), 2),
    "sd2_lora_te": ("tiny_sd2", dict(use_lora=True, text_encoder_ratio=0.5, mixed_precision="no",
                                     gradient_checkpointing=True), None),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _live_tensors() -> int:
    import torch

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _hash_tensors(tensors: dict) -> str:
    import torch

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu", torch.float32).contiguous()
        h.update(k.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def run_job(name: str, models_dir: str, work: str) -> dict:
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from trainer_fixtures import make_concept, tiny_settings

    from comfyui_dreambooth.training.models import load_model
    from comfyui_dreambooth.training.sampling import generate
    from comfyui_dreambooth.training.trainer import TrainCallbacks, TrainingInterrupted, train

    stem, changes, stop_after = JOBS[name]
    with torch.inference_mode():
        model = load_model(os.path.join(models_dir, stem + ".safetensors"))
        concept = make_concept(os.path.join(work, name), n=2)
        settings = tiny_settings(steps_per_image=2, **changes)
        seen = {"step": 0}
        cb = TrainCallbacks(progress=lambda p: seen.update(step=p["step"]),
                            should_stop=(lambda: seen["step"] >= stop_after) if stop_after else None)
        out = os.path.join(work, name, "out")
        try:
            result = train(model, [concept], settings, output_root=out, resume="new", callbacks=cb)
        except TrainingInterrupted as e:
            return {"interrupted_at": e.step,
                    "weights": _hash_tensors(load_file(os.path.join(e.checkpoint, "trainable.safetensors")))}
        weights = _hash_tensors(load_file(os.path.join(result.run_dir, "final", "trainable.safetensors")))
        images = generate(result.model, "a photo of sks dog", steps=2, cfg=3.0, seed=1, width=64, height=64)
        return {"steps": result.steps, "weights": weights, "images": _hash_tensors({"i": images})}


def main(argv: list[str]) -> None:
    import tempfile

    import torch

    torch.set_num_threads(1)
    models_dir, out_path, jobs = argv[0], argv[1], argv[2:]
    results, memory = [], []
    with tempfile.TemporaryDirectory() as work:
        for i, name in enumerate(jobs):
            results.append([name, run_job(name, models_dir, os.path.join(work, str(i)))])
            memory.append({"after": name, "live_tensors": _live_tensors(), "rss_mb": round(_rss_mb(), 1)})
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"results": results, "memory": memory}, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
