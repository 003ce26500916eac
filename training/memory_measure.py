"""The memory accounting: one real training step of the pack, at full size, counted without a GPU.

`measure(model, settings)` runs what a training run runs between its data and its second optimizer step — the
received model placed on the device (trainer.place_model), the trained copy with its memory settings, the
optimizer, LR / noise schedules and EMA (trainer.build_training), then two optimizer steps (loop.train_step:
forward, loss, backward, clipping, optimizer step, zero_grad, EMA) — on torch's fake tensors (FakeTensorMode: real
shapes and dtypes, no data, no compute), and counts every tensor with torch's MemTracker
(torch.distributed._tools.mem_tracker). The second step holds the steady state (the optimizer state exists
from its start); the peak over the whole run and the step that holds it are reported, per kind:

  weights (parameters and buffers on the accelerator), gradients, optimizer (state), ema (the EMA copy),
  activations (what the forward keeps for backward, autocast's weight casts, the batch), temporaries (what the
  backward and optimizer make and free: gradients of activations, recomputation with gradient checkpointing).

The fake tensors live on the CPU (a fake CUDA tensor cannot be made by a CPU build of torch), so the pack tells
the accelerator from the host itself: while the accounting runs, devices.is_accelerator says yes for the CPU and
devices.to_host books a module as moved off the accelerator (the received UNet once its copy trains, the VAE and
frozen text encoders once their outputs are cached, an EMA on the CPU) instead of moving it; booked tensors are
counted apart and left out of the peak.

What it cannot see (README, "Memory settings"): the CUDA context (~300-500 MB), the caching allocator's
fragmentation and rounding, kernel workspaces (cuBLAS / cuDNN / attention kernels' scratch memory), and kernels
that differ between the CPU and CUDA (CPU autocast's op list; the CPU flash-attention kernel stands for CUDA's
memory-efficient ones). fp16 mixed precision is counted as bf16 (same sizes; the CPU's autocast). The data's own
encoding (VAE, uncached text encoders) is not part of the step: latents and text embeddings arrive as the batch.

Nothing of this runs in a training run: the trainer never imports this module.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from .devices import GB, PartBytes, SimulatedAccelerator

MEASURED_BY = "fake tensors, CPU kernels"
KINDS = ("weights", "gradients", "optimizer", "ema", "activations", "temporaries")
STEPS = 2                   # the second step is the steady state: optimizer state present from its start


@dataclass
class Measurement(PartBytes):
    """The accounted peak on the accelerator: bytes per kind (`parts`, keys KINDS), where it happened (`peak_at`),
    each stage's own peak (`stages`), bytes booked off the accelerator (`host`), and what stays resident
    (`resident`: unet / text_encoders / vae parameters on the accelerator, constant during the steps), and the
    largest size of each MemTracker kind during the steps, each at its own moment (`each_peak`: param, buffer,
    grad, act, temp, opt, oth, total), and what the optimizer state and the EMA copy hold on the accelerator
    after the last step (`held`: optimizer, ema)."""
    parts: dict
    peak_at: str
    stages: dict = field(default_factory=dict)
    host: int = 0
    resident: dict = field(default_factory=dict)
    each_peak: dict = field(default_factory=dict)
    held: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"{k:<14}{v / GB:8.3f} GB" for k, v in self.parts.items()]
        lines.append(f"{'total':<14}{self.total / GB:8.3f} GB  (peak: {self.peak_at})")
        lines += [f"  {stage}: peak {v / GB:.3f} GB" for stage, v in self.stages.items()]
        lines.append(f"off the accelerator (host): {self.host / GB:.3f} GB; measured by {MEASURED_BY}, "
                     f"{self.seconds:.0f} s")
        lines += self.notes
        return "\n".join(lines)


def measure(model, settings, resolution: int | None = None, batch: int | None = None, *,
            loaded_dtype: str = "fp16", concepts=(), on_cpu: bool = False) -> Measurement:
    """The accounted peak of training `model` (an SDModel, a ModelShape or a family keyword sd15 / sd2 / sdxl:
    only its architecture is used, rebuilt on fake tensors) with `settings` at `resolution` / `batch` (default:
    the settings' own). `loaded_dtype`: the precision the received model was loaded in (fp16 / bf16 / fp32).
    on_cpu: account a run on the CPU instead (nothing is an accelerator: every tensor of the run counts, the
    received model included, as in the process's resident memory)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .memory import model_shape

    start = time.monotonic()
    s = settings if settings.is_resolved else settings.resolved(list(concepts))
    resolution = resolution or s.data.resolution
    batch = batch or s.batch_size
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[loaded_dtype]
    notes = []
    if s.mixed_precision == "fp16" and not on_cpu:
        s = s.replace(mixed_precision="bf16")
        notes.append("mixed_precision fp16 counted as bf16 (same sizes; the CPU's autocast)")
    shape = model_shape(model)
    with FakeTensorMode(allow_non_fake_inputs=True) as fake, _swappable(fake), torch.inference_mode(False):
        received = _fake_model(shape, getattr(model, "prediction_type", None), dtype)
        tracker = _step_tracker()
        simulated = contextlib.nullcontext() if on_cpu else SimulatedAccelerator(tracker.book)
        with simulated, _fresh_accelerate(), tracker:
            tracker.track_external(*received.modules())
            for m in received.modules() if not on_cpu else []:    # loaded on the CPU (as ComfyUI holds a
                tracker.book(m, True)                                 # model it is not running)
            job = _job(received, s, resolution, batch, list(concepts))
            from .trainer import build_training, place_model

            tracker.stage, tracker.building = "data preparation (the received model placed)", True
            place_model(job)
            tracker.stage = "building the trained model"
            build_training(job)
            tracker.built(job)
            tracker.building = False
            from .loop import train_step

            for step in range(STEPS):
                tracker.stage = f"step {step + 1}"
                tracker.reset_mod_stats()
                train_step(job, step, [job.data.largest_batch_plan()], te_frozen=job.te_steps == 0, read_loss=False)
                tracker.stepped(job)
        resident = tracker.resident(job)
        job.held.close()
    return Measurement(tracker.peak_parts(), tracker.peak_at, dict(tracker.stage_peaks), tracker.host_bytes(),
                       resident, tracker.each_kind_peak(), dict(tracker.held), notes, time.monotonic() - start)


# ---- the model and the run, on fake tensors ---------------------------------------------------------------------
def _fake_model(shape, prediction_type, dtype):
    """The architecture of `shape`'s modules rebuilt under the active FakeTensorMode (their own configs), frozen,
    in `dtype`, as the SDModel a loader would hand over."""
    from .models.components import SDModel
    from .models.tokenizing import tokenizers_for_family

    def rebuild(m):
        made = type(m).from_config(m.config) if hasattr(type(m), "from_config") else type(m)(m.config)
        return made.to(dtype).eval().requires_grad_(False)

    pred = prediction_type or ("v_prediction" if shape.family == "sd2" else "epsilon")
    return SDModel(family=shape.family, prediction_type=pred, unet=rebuild(shape.unet), vae=rebuild(shape.vae),
                   text_encoders=[rebuild(te) for te in shape.text_encoders],
                   tokenizers=tokenizers_for_family(shape.family), source_hash=f"accounting-{shape.family}")


@contextlib.contextmanager
def _swappable(fake):
    """Module.to / .half on fake parameters swaps tensors (torch.utils.swap_tensors), which refuses a tensor that
    something holds a weak reference to, and the fake mode's converter holds one to every fake Parameter (its
    memo). The memo entry of the two swapped tensors is dropped first (fake Parameters are never converted again)."""
    import torch

    from torch.overrides import TorchFunctionMode

    memo = fake.fake_tensor_converter.meta_converter.tensor_memo
    swap = torch.utils.swap_tensors

    class CopyInThisMode(TorchFunctionMode):
        """copy.deepcopy of a fake tensor (a trainable copy) stays in this fake mode; torch's own deepcopy makes
        it in another one, which no operation may mix with this one's."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is not torch.Tensor.__deepcopy__:
                return func(*args, **(kwargs or {}))
            t, copies = args
            if id(t) not in copies:
                with torch.no_grad():
                    out = t.clone()
                if getattr(t, "_is_param", False) or isinstance(t, torch.nn.Parameter):
                    out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
                copies[id(t)] = out
            return copies[id(t)]

    def swap_unmemoized(t1, t2):
        if (t1.dtype, t1.shape, t1.stride(), t1.storage_offset(), t1.untyped_storage()._cdata) == (
                t2.dtype, t2.shape, t2.stride(), t2.storage_offset(), t2.untyped_storage()._cdata):
            return      # .to() that changes nothing (the device is already right): a real tensor stays as it is,
            # with its hooks (a swap would leave fused_backward's gradient hooks on the discarded twin)
        for key in [k for k, v in memo.items() if v is t1 or v is t2]:
            del memo[key]
        swap(t1, t2)

    torch.utils.swap_tensors = swap_unmemoized
    try:
        with CopyInThisMode():
            yield
    finally:
        torch.utils.swap_tensors = swap


@contextlib.contextmanager
def _fresh_accelerate():
    from .trainer import fresh_accelerate_state

    with fresh_accelerate_state():
        yield


def _job(model, settings, resolution, batch, concepts):
    import torch
    from accelerate import Accelerator

    from .control import TrainCallbacks
    from .data.settings import ConceptSettings
    from .loop import Job

    mp = settings.mixed_precision
    job = Job(model=model, concepts=concepts or [ConceptSettings(instance_prompt="a photo of sks dog",
                                                                 class_prompt="a photo of a dog")],
              settings=settings, output_root="", device=torch.device("cpu"), cb=TrainCallbacks(),
              held=contextlib.ExitStack(), say=lambda msg: None, accelerator=Accelerator(mixed_precision=mp, cpu=True),
              mp=mp)
    job.data = _FakeData(model, settings, resolution, batch)
    job.total_steps = STEPS
    job.te_steps = STEPS if settings.trains_text_encoder else 0
    job.zero_terminal_snr = bool(settings.zero_terminal_snr)
    return job


class _FakeData:
    """The batch of a step at `resolution` x `batch`, as the data pipeline hands it over (cached latents, cached
    text embeddings unless a text encoder trains), made of fake tensors."""

    def __init__(self, model, settings, resolution, batch):
        self.model, self.settings, self.resolution, self.batch = model, settings, resolution, batch
        self.latent_cache = True if settings.data.cache_latents else None
        te_trained = settings.trains_text_encoder
        self.text_cache = True if settings.data.cache_text_embeds and not te_trained else None
        self.text_encoder_trained = te_trained

    def largest_batch_plan(self):
        from .data.dataset import PlanItem

        b = self.resolution
        return PlanItem(epoch=0, position=0, bucket=(b, b), items=tuple(range(self.batch)),
                        flips=(False,) * self.batch)

    def load_batch(self, plan_item, *, device=None, dtype=None, generator=None):
        import torch

        from .data.dataset import Batch

        n, m = len(plan_item.items), self.model
        side = self.resolution // m.vae_scale_factor
        latents = torch.randn(n, m.unet.config.in_channels, side, side, device=device, dtype=dtype)
        embeds = pooled = time_ids = None
        if not self.text_encoder_trained:
            ctx = m.unet.config.cross_attention_dim
            embeds = torch.randn(n, 77, ctx, device=device, dtype=dtype)
            if m.is_sdxl:
                pooled = torch.randn(n, m.text_encoders[-1].config.projection_dim, device=device, dtype=dtype)
        if m.is_sdxl:
            time_ids = torch.randn(n, 6, device=device, dtype=dtype)
        return Batch(latents=latents, captions=["a photo of sks dog"] * n, embeds=embeds, pooled=pooled,
                     is_prior=torch.zeros(n, dtype=torch.bool, device=device),
                     loss_weights=torch.ones(n, device=device), time_ids=time_ids, paths=[""] * n,
                     concept_indices=[0] * n, flips=[False] * n)


# ---- the tracker: torch's MemTracker, with the pack's host bookings and a cheap peak ------------------------------
def _step_tracker():
    """A MemTracker that (1) counts storages booked with `book` under the host, not the accelerator, (2) counts
    what the build stage allocates as weights (parameters, copies, casts, EMA; re-sorted once built), and (3)
    keeps only the global peak and where it happened (MemTracker's per-module peaks cost a pass over every
    module at every operation: an hour for SDXL on two cores; the snapshots at each module's entry and exit are
    kept)."""
    import torch
    from torch.distributed._tools import mem_tracker as mt
    from torch.distributed._tools.common_utils import get_untyped_storages
    from torch.utils._pytree import tree_leaves

    accelerator, host = torch.device("cpu"), torch.device("meta")
    ref, total_key = mt._MemRefType, mt._TOTAL_KEY

    class StepTracker(mt.MemTracker):
        def __init__(self):
            super().__init__()
            self.stage, self.peak_at, self.stage_peaks, self.kind_peaks, self.held = "start", "", {}, {}, {}
            self.from_host = self.building = False

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # MemTracker's own registers a gradient hook on every parameter, which torch refuses for frozen ones
            def grad_seen(grad):
                if grad is not None:
                    self._update_and_maybe_create_winfos(grad, ref.GRAD)

            def accumulated(p):       # after fused_backward's own hook: a bf16 weight rewritten there is a weight
                grad_seen(p.grad)
                self._update_and_maybe_create_winfos(p, ref.PARAM)

            weights = buffers = 0
            for p in module.parameters():
                weights += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(p, ref.PARAM))
                grad_seen(p.grad)
                if install_grad_hooks and p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(grad_seen), p.register_post_accumulate_grad_hook(accumulated))
            for b in module.buffers():
                buffers += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(b, ref.BUFFER))
            return weights, buffers

        def _track(self, reftype, t):
            super()._track(ref.PARAM if self.building else reftype, t)
            if self.from_host:
                self._move([info for _, info in self._infos([t])], host)

        def _update_peak_stats(self, peak_state):
            snap = self._curr_mem_snap.get(accelerator)
            if snap is None:
                return
            now = snap[total_key]
            if self.stage.startswith("step"):
                for kind, size in snap.items():
                    if size > self.kind_peaks.get(kind, 0):
                        self.kind_peaks[kind] = size
            if now > self.stage_peaks.get(self.stage, 0):
                self.stage_peaks[self.stage] = now
            if now > self._peak_mem.get(accelerator, 0):
                self._peak_mem[accelerator], self._peak_mem_snap[accelerator] = now, dict(snap)
                self.peak_at = self._where()

        def _where(self) -> str:
            if self._in_opt:
                return f"{self.stage}, optimizer step"
            inside = [p for p in self._mod_tracker.parents if p != "Global"]
            phase = "backward" if self._mod_tracker.is_bw else ("forward" if inside else "")
            deepest = max(inside, key=lambda p: p.count("."), default="")
            return ", ".join(x for x in (self.stage, phase, f"in {deepest}" if deepest else "") if x)

        def _infos(self, tensors, kind=None):
            for t in tensors:
                if kind is not None:
                    self._update_and_maybe_create_winfos(t, kind)
                for st in get_untyped_storages(t):
                    found = self._WINFO.get(st)
                    if found is not None:
                        yield st, found[0]

        def book(self, obj, on_host: bool):
            """devices.to_host / to_device while the accounting runs: `obj` (module or tensor) leaves or reaches
            the accelerator."""
            tensors = [*obj.parameters(), *obj.buffers()] if isinstance(obj, torch.nn.Module) else [obj]
            self._move([info for _, info in self._infos(tensors, ref.PARAM)], host if on_host else accelerator)

        def _move(self, infos, where):
            for info in {id(i): i for i in infos}.values():
                if info.device != where:
                    if info.mem_consumed:
                        self._update_snap(mt._UpdateType.DEL, info)
                    info.device = where
                    if info.mem_consumed:
                        self._update_snap(mt._UpdateType.ADD, info)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # an operation on host tensors only (a copy of a parked module, its cast) makes host tensors
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            self.from_host = bool(inputs) and all(
                (found := self._WINFO.get(st)) is not None and found[0].device == host
                for t in inputs for st in get_untyped_storages(t))
            try:
                return super().__torch_dispatch__(func, types, args, kwargs)
            finally:
                self.from_host = False

        def built(self, job):
            """Re-sort what the build made: module tensors as weights, the EMA copy as `ema`."""
            self.track_external(*job.tm.modules(), *job.model.modules())
            if job.ema is not None:
                list(self._infos(_tensors(job.ema.state_dict()), ref.OTH))

        def stepped(self, job):
            """The optimizer state made during the step (inside backward with fused_backward) as optimizer; its
            size (and the EMA copy's) on the accelerator after the step, each storage once, as `held`."""
            self.track_external(*job.tm.modules(), *job.model.modules())   # weights rewritten by the step
            self.held = {"optimizer": self._size(_tensors(job.optimizer.state_dict()), ref.OPT),
                         "ema": self._size(_tensors(job.ema.state_dict()) if job.ema is not None else [], ref.OTH)}

        def _size(self, tensors, kind) -> int:
            infos = {id(info): info for _, info in self._infos(tensors, kind) if info.device != host}
            return sum(info.mem_consumed for info in infos.values())

        def peak_parts(self) -> dict:
            snap = self._peak_mem_snap.get(accelerator, {})
            get = lambda *kinds: sum(int(snap.get(k, 0)) for k in kinds)     # noqa: E731
            return {"weights": get(ref.PARAM, ref.BUFFER), "gradients": get(ref.GRAD), "optimizer": get(ref.OPT),
                    "ema": get(ref.OTH), "activations": get(ref.ACT), "temporaries": get(ref.TEMP)}

        def each_kind_peak(self) -> dict:
            """The largest size of each kind during the steps (each at its own moment)."""
            return {kind.name.lower() if hasattr(kind, "name") else str(kind).lower(): int(size)
                    for kind, size in self.kind_peaks.items()}

        def host_bytes(self) -> int:
            return int(self._curr_mem_snap.get(host, {}).get(total_key, 0))

        def resident(self, job) -> dict:
            """Bytes of the parameters left on the accelerator, per model part (each storage counted once;
            buffers, e.g. CLIP's position ids, are in the peak's weights but not here)."""
            seen, out = set(), {}
            groups = {"unet": [job.tm.unet, job.model.unet], "text_encoders": [*job.tm.text_encoders,
                                                                              *job.model.text_encoders],
                      "vae": [job.tm.vae, job.model.vae]}
            for name, modules in groups.items():
                tensors = [t for m in modules for t in m.parameters()]
                out[name] = 0
                for _, info in self._infos(tensors):
                    if id(info) not in seen and info.device != host:
                        seen.add(id(info))
                        out[name] += info.mem_consumed
            return out

    return StepTracker()


def _tensors(tree) -> list:
    """Every tensor inside nested dicts / lists / tuples (a state_dict)."""
    import torch

    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []
