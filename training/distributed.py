"""Data-parallel training across processes (`accelerate launch`, torchrun, `run --num-processes N`).

Why not accelerate's DDP wrapper: the text encoders run outside it (their gradients were never averaged),
prior_mode base_model runs the UNet forward twice before one backward (DDP rejects it), and gradient
accumulation synced on every micro-batch. Averaging the gradients of every trained tensor once per optimizer
step, after accumulation, is correct in all three cases and has no wrapper to forget. The cost is that the
all-reduce does not overlap the backward pass (negligible for adapters; for a full fine-tune it is one
gradient-sized transfer per optimizer step, not per micro-batch).

The rules every rank follows, so that collective calls stay in step:
- every rank runs the same number of optimizer steps: the epoch's batches are padded (see `shard_plan`);
- decisions that one rank could take alone (stop, save now, diverged loss) are all-reduced first;
- only rank 0 writes files; the others learn its decisions (run folder, checkpoint to resume) by broadcast.
"""
from __future__ import annotations

import contextlib
import datetime
import os

from .fsutil import atomic_write_text

BUCKET_ELEMENTS = 32 * 1024 * 1024          # gradients are averaged in flat buckets of at most this many values
DEFAULT_TIMEOUT_MIN = 30.0
# set by `comfyui-dreambooth run --num-processes` for the processes it launches: a folder where each registers
# its pid (the command passes Ctrl-C on to them) and a sign that the command reports their interrupt
SUPERVISOR_ENV = "COMFYUI_DREAMBOOTH_SUPERVISOR"


def collective_timeout() -> datetime.timedelta:
    """How long a rank waits in a collective call before failing instead of hanging (rank 0 may be generating
    class images or previews meanwhile). COMFYUI_DREAMBOOTH_COLLECTIVE_TIMEOUT_MIN overrides it."""
    raw = os.environ.get("COMFYUI_DREAMBOOTH_COLLECTIVE_TIMEOUT_MIN", "")
    try:
        minutes = float(raw) if raw.strip() else DEFAULT_TIMEOUT_MIN
    except ValueError:
        raise ValueError(f"COMFYUI_DREAMBOOTH_COLLECTIVE_TIMEOUT_MIN={raw!r} is not a number of minutes") from None
    return datetime.timedelta(minutes=max(minutes, 0.1))


def shard_plan(plan: list, rank: int, world: int) -> list:
    """This rank's batches of an epoch plan: a disjoint, interleaved share, padded so that every rank gets
    ceil(len(plan) / world) batches. Padding repeats batches from the start of the (shuffled) plan, so the
    few extra examples are seen twice in that epoch rather than some ranks stepping without the others."""
    if world <= 1:
        return list(plan)
    per_rank = -(-len(plan) // world)
    padded = list(plan) + [plan[i % len(plan)] for i in range(per_rank * world - len(plan))]
    return padded[rank::world]


class Dist:
    """The collective operations the trainer needs; every method is a no-op for one process."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def broadcast(self, value):
        """Rank 0's `value` on every rank (any picklable object)."""
        if not self.active:
            return value
        import torch.distributed as td

        box = [value if self.main else None]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def decide(self, choose, what: str):
        """`choose()` run by rank 0 alone (it holds the run folder's lock and writes its files); its result on
        every rank. When it raises, every rank raises too: rank 0 its own error, the others one that quotes it
        (a rank that raised before a collective call would leave the others waiting in it)."""
        if not self.active:
            return choose()
        if self.main:
            try:
                value = choose()
            except Exception as e:
                self.broadcast(("error", f"{type(e).__name__}: {e}"))
                raise
            return self.broadcast(("ok", value))[1]
        kind, value = self.broadcast(None)
        if kind == "error":
            raise RuntimeError(f"process 0 could not {what}: {value}")
        return value

    def broadcast_tensors(self, tensors) -> None:
        """Copy rank 0's values into `tensors` on every rank (freshly initialised adapters differ)."""
        if not self.active:
            return
        import torch.distributed as td

        for t in tensors:
            td.broadcast(t.data, src=0)

    def sum(self, values: list[float], device) -> list[float]:
        """Element-wise sum of `values` over the ranks (one small all-reduce)."""
        if not self.active:
            return list(values)
        import torch
        import torch.distributed as td

        t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
        td.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def average_gradients(self, params) -> None:
        """Replace each gradient by its mean over the ranks: flat buckets per dtype, one all-reduce each."""
        if not self.active:
            return
        import torch.distributed as td
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        by_kind: dict = {}
        for p in params:
            if p.grad is not None:
                by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in by_kind.values():
            bucket, size = [], 0
            for g in grads + [None]:
                if g is not None and (not bucket or size + g.numel() <= BUCKET_ELEMENTS):
                    bucket.append(g)
                    size += g.numel()
                    continue
                if bucket:
                    flat = _flatten_dense_tensors(bucket)
                    td.all_reduce(flat)
                    flat.div_(self.world)
                    for g_old, g_new in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                        g_old.copy_(g_new)
                if g is not None:
                    bucket, size = [g], g.numel()


def process_info() -> tuple[int, int]:
    """(rank, world size) as launchers (torchrun / accelerate launch) set them; (0, 1) otherwise."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


def pin_local_device() -> None:
    """Several processes on one machine: each uses its own GPU (LOCAL_RANK) from the start. Without it every
    process loads its model onto GPU 0 before the Accelerator exists (N copies on one card, then a move)."""
    rank, world = process_info()
    if world <= 1:
        return
    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        count = torch.cuda.device_count()
        if local >= count:
            raise RuntimeError(f"process {rank} wants GPU {local} (LOCAL_RANK) but this machine shows {count} "
                               f"GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                               "start at most one process per GPU")
        torch.cuda.set_device(local)


# ---- `run --num-processes`: the command supervises the processes it launched (runner/launch.py) ----------------
STOPPED_TOGETHER = "stopped-together"


def _registry() -> str | None:
    registry = os.environ.get(SUPERVISOR_ENV)
    return registry if registry and os.path.isdir(registry) else None


def mark_stopped_together() -> None:
    """The training loop stopped on every process at the same step (agreed by all-reduce, checkpoint written):
    the one kind of interrupt after which every process can exit cleanly, with no process left waiting."""
    registry = _registry()
    if registry:
        with contextlib.suppress(OSError):
            atomic_write_text(os.path.join(registry, STOPPED_TOGETHER), "1")


def stopped_together() -> bool:
    """A supervised process's training stopped together with the others (see mark_stopped_together)."""
    registry = _registry()
    return bool(registry) and os.path.exists(os.path.join(registry, STOPPED_TOGETHER))


def register_with_supervisor(rank: int) -> str | None:
    """Tell the launching command this process's pid (it passes Ctrl-C on to it); call once this process handles
    Ctrl-C itself. Returns the file to remove at exit (a later press must not reach a reused pid)."""
    registry = _registry()
    if not registry:
        return None
    path = os.path.join(registry, f"rank-{rank}.pid")
    with contextlib.suppress(OSError):
        atomic_write_text(path, str(os.getpid()))
    return path
