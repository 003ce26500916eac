"""Pre-flight: before the first real step, one forward/backward at the largest bucket and the full batch, with
its peak memory measured. Out of memory an hour into a run is the classic DreamBooth failure (a larger bucket
comes late, or the optimizer state is allocated at the first step); this finds it in seconds, before a run folder
exists, and says what to change — or, with auto_fit, changes it (the wizard's next saving) and tries again.

Measured: the accelerator's peak allocation during the probe step (weights, EMA, activations, gradients) plus
the optimizer state, which the first real step allocates (exact, from training/memory.py). The probe never
changes the training state: gradients are dropped, fused_backward's in-backward steps are paused, and the
step's random draws are seeded by step like every other.

Only where the device reports its memory (CUDA); on the CPU the pre-flight is skipped (system RAM).
"""
from __future__ import annotations

import contextlib

GB = 1024 ** 3
HEADROOM = 0.95            # of the memory available: allocator fragmentation and the CUDA context's slack


class DoesNotFit(RuntimeError):
    """The pre-flight step would not fit: raised before training (nothing was trained or written)."""

    def __init__(self, message: str, next_settings=None, change: str = ""):
        super().__init__(message)
        self.next_settings, self.change = next_settings, change


def device_budget(device) -> int | None:
    """Bytes this process can use on `device`: free memory plus what its allocator already holds; None where
    the device cannot say (CPU)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device))


def measure_step(device, run_step) -> int | None:
    """Peak bytes allocated on `device` while `run_step()` runs; None when it ran out of memory."""
    import torch

    torch.cuda.reset_peak_memory_stats(device)
    try:
        run_step()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return int(torch.cuda.max_memory_allocated(device))


@contextlib.contextmanager
def no_optimizer_steps(optimizer):
    """fused_backward steps each weight inside backward; during the probe its hooks only drop the gradients."""
    inner = getattr(optimizer, "optimizer", optimizer)        # accelerate's wrapper holds ours
    if not getattr(inner, "fused", False):
        yield
        return
    step_one = inner._step_one
    inner._step_one = lambda p: None
    try:
        yield
    finally:
        inner._step_one = step_one


def next_saving(settings, images: int, processes: int = 1):
    """(description, changed settings) of the wizard's first saving that applies to `settings`, or (None, None).
    Several processes: savings they refuse (fused_backward steps before gradients are averaged) are skipped."""
    from .wizard import savings

    for text, change in savings(settings.use_lora, max(1, images), imagic=settings.train_imagic_only):
        changed = change(settings)
        if changed is not None and processes > 1 and changed.fused_backward:
            continue
        if changed is not None:
            try:
                changed.check(check_environment=False)
            except ValueError:
                continue
            return text, changed
    return None, None


def verdict(*, device, need: int | None, budget: int, peak: int | None, optimizer_bytes: int, bucket, batch: int,
            settings, images: int, estimate_text: str, processes: int = 1) -> DoesNotFit | None:
    """None when the step fits `budget`; else the error to raise (carrying the next saving for auto_fit)."""
    if need is not None and need <= budget * HEADROOM:
        return None
    change, changed = next_saving(settings, images, processes)
    w, h = bucket
    measured = ("ran out of memory" if peak is None else
                f"needs {need / GB:.2f} GB (peak {peak / GB:.2f} GB + optimizer state {optimizer_bytes / GB:.2f} GB)")
    lines = [f"pre-flight on {device}: one training step at the largest bucket {w}x{h} with batch {batch} "
             f"{measured}; {budget * HEADROOM / GB:.2f} GB usable. Nothing was trained."]
    if change:
        lines.append(f"next saving: {change}. Turn auto_fit on (DreamBooth Advanced) to apply savings until it "
                     "fits, or let the Performance Wizard choose the settings.")
    else:
        lines.append("every saving is already on: train at a smaller resolution (bucket_max_side) or on a larger "
                     "card.")
    lines.append("estimate of these settings:\n" + estimate_text)
    return DoesNotFit("\n".join(lines), changed, change or "")
