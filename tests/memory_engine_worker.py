"""Worker process for tests/test_memory_engine.py's combination test: the 14 memory-engine combinations are
independent tiny-model runs, so the test module trains them in two of these processes side by side (each on one
torch thread, as the module's `single_thread` fixture does in-process) instead of one after another.

A run here is exactly what the test used to do in its own process: train the fresh tiny SD1 model (one per worker,
never modified by training) with the given settings and concept, then export the result. What the test checks of
the in-memory result comes back as plain values; the files (loss log, export) are checked by the test itself."""
from __future__ import annotations


_MODEL = None


def _setup() -> None:
    import torch

    torch.set_num_threads(1)


def train_and_export(settings, concept, output_root: str, export_path: str, use_lora: bool) -> dict:
    """Train, then save a LoRA (use_lora) or a full checkpoint (fp16) to `export_path`.

    Returns the run folder and the dtypes of the trained model's UNet parameters."""
    global _MODEL
    from comfyui_dreambooth.training.export.checkpoint import export_checkpoint
    from comfyui_dreambooth.training.export.lora import save_kohya_lora
    from comfyui_dreambooth.training.models import build_tiny_model
    from comfyui_dreambooth.training.trainer import train

    if _MODEL is None:
        _MODEL = build_tiny_model("sd1")
    result = train(_MODEL, [concept], settings, output_root=output_root)
    if use_lora:
        save_kohya_lora(result.model, export_path, dtype="fp16")
    else:
        export_checkpoint(result.model, export_path, dtype="fp16")
    return {"run_dir": result.run_dir, "unet_dtypes": sorted({str(p.dtype) for p in result.model.unet.parameters()})}


def start_pool(workers: int = 2):
    """A pool of fresh interpreters (spawn: no forked torch state) with this module's per-process setup."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_setup)
