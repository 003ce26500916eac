"""Shared helpers for the trainer / run / TrainDreamBooth tests (imported by tests/test_trainer_*.py,
tests/test_runs.py and tests/test_node_train.py; pytest puts tests/ on sys.path).

Everything is tiny: 64x64 images (32x32 latents), the tiny random-init models, a handful of optimizer steps.
"""
from __future__ import annotations

import hashlib
import json
import os


def make_images(folder: str, n: int = 4, size: int = 64, seed: int = 0) -> str:
    """`n` distinct smooth colour images (gradients + a blob): learnable, unlike pure noise."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        base = rng.random(3)
        img = np.stack([base[c] * (0.5 + 0.5 * (xx if c % 2 else yy)) for c in range(3)], axis=-1)
        cx, cy = rng.random(2)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < 0.05] = rng.random(3)
        Image.fromarray((img * 255).astype("uint8")).save(os.path.join(folder, f"img_{i}.png"))
    return folder


def make_concept(root: str, n: int = 4, **changes):
    """A ConceptSettings over `n` fresh images in `root`/instance (prompt 'a photo of sks dog')."""
    from comfyui_dreambooth.training.data.settings import ConceptSettings

    inst = make_images(os.path.join(str(root), "instance"), n)
    kw = dict(instance_dir=inst, instance_prompt="a photo of sks dog", class_prompt="a photo of dog",
              num_class_images_per_image=0)
    kw.update(changes)
    return ConceptSettings(**kw)


def tiny_settings(**changes):
    """DreamBoothSettings sized for the tiny models: 64px data, fp32, no checkpoints/previews unless asked."""
    from comfyui_dreambooth.training.data.settings import DataSettings
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    kw = dict(use_lora=True, lora_rank=4, lora_alpha=4.0, learning_rate=1e-3, steps_per_image=2, batch_size=1,
              text_encoder_ratio=0.0, mixed_precision="no", gradient_checkpointing=False, lr_scheduler="constant",
              save_every_epochs=0, preview_every_epochs=0, preview_steps=2, max_grad_norm=1.0,
              data=DataSettings(resolution=64, bucket_min_side=64, bucket_max_side=128))
    data_changes = changes.pop("data", None)
    kw.update(changes)
    if data_changes:
        kw["data"] = kw["data"].replace(**data_changes)
    return DreamBoothSettings(**kw)


def module_hash(module) -> str:
    """sha256 over every tensor of a module's state dict (names, dtypes, bytes)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        with torch.inference_mode(False):
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_hash(model) -> str:
    """Hash of everything a model carries that training could touch: weights (all parts), flags, dtype."""
    parts = [model.unet, model.vae, *model.text_encoders]
    h = hashlib.sha256()
    for m in parts:
        h.update(module_hash(m).encode())
        h.update(repr([(n, p.requires_grad, p.dtype, str(p.device)) for n, p in m.named_parameters()]).encode())
        processors = getattr(m, "attn_processors", None)      # UNet / VAE: attention implementation in use
        if processors:
            h.update(repr(sorted({type(p).__name__ for p in processors.values()})).encode())
    h.update(json.dumps(model.metadata, sort_keys=True, default=str).encode())
    h.update(repr(model.ema_unet is None).encode())
    return h.hexdigest()


def read_losses(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "loss.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
