"""The DreamBooth training loop. Read `train()` top to bottom: prepare → build → loop → finish.

One optimizer step = `gradient_accumulation_steps` planned batches. Every random draw of step s comes from
generators seeded by (seed, s), and the data order of an epoch is a function of (seed, epoch): a run resumed
from the checkpoint of step s therefore continues exactly where the uninterrupted run would have been.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from .checkpoints import (apply_checkpoint, create_run, first_loadable, load_weights, names_a_checkpoint,
                          read_own_checkpoint, resume_target, write_state)
from .compat import enable_text_encoder_checkpointing
from .control import (TrainCallbacks, TrainingDiverged, TrainingInterrupted, TrainingSaveError, TrainResult,
                      format_eta)
from .distributed import Dist, collective_timeout, mark_stopped_together, process_info, shard_plan
from .runs import RunFolder, compute_run_id
from .setup.noise import base_model_prior_loss, example_generators, seed_global_rng, step_seed
from .setup.trainable import build_trainable, finish_model, named_trainables, owned_modules, set_attention, trainable_copy


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _fresh_accelerate_state():
    """accelerate keeps one process-wide AcceleratorState: a second run with other mixed precision in the same
    process (ComfyUI runs every queued prompt in one) fails with "already initialized". Each run starts from a
    clean state and leaves none behind; the distributed setup (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
def train(model, concepts, settings, *, output_root: str, resume: str = "auto", device=None,
          callbacks: TrainCallbacks | None = None, reuse_finished: bool = True) -> TrainResult:
    """Train `model` on `concepts` with `settings`; returns a new model (the input is untouched).

    resume: "auto" continues an interrupted run with the same settings/data/model if one has a checkpoint,
    "new" always starts fresh, or a path to a run folder / checkpoint folder to continue.
    A finished identical run under `output_root` is reused instead of retrained (reuse_finished).
    """
    import torch

    from .preflight import DoesNotFit

    cb = callbacks or TrainCallbacks()
    unet_home = next(model.unet.parameters()).device
    try:
        while True:
            try:
                with torch.inference_mode(False), _fresh_accelerate_state(), torch.random.fork_rng(
                        devices=[] if device is None or str(device) == "cpu" else None):
                    with contextlib.ExitStack() as held:     # the run folder's lock, released however the run ends
                        return _train(model, list(concepts), settings, output_root, resume, device, cb,
                                      reuse_finished, held)
            except DoesNotFit as e:       # the pre-flight step would not fit: with auto_fit, the next saving
                if not settings.auto_fit or e.next_settings is None:
                    raise
                if cb.log and process_info()[0] == 0:        # one voice, as in the run
                    cb.log(f"pre-flight: does not fit; auto_fit turns on {e.change}")
                settings = e.next_settings
            # out of the except block: the handled exception's traceback (it holds the failed attempt's model
            # copy and optimizer) is released only there; a reference cycle, freed by a collection, before the
            # next attempt's probe measures
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        if next(model.unet.parameters()).device != unet_home:     # parked during training: put it back
            model.unet.to(unet_home)


@dataclass
class _Job:
    """One training run, filled in stage by stage by `_train` (the stages read and write its fields)."""

    model: object                       # the received SDModel (never modified; its modules may be shared)
    concepts: list
    settings: object
    output_root: str
    device: object
    cb: TrainCallbacks
    held: contextlib.ExitStack          # what must be undone however the run ends (lock, hooks, devices)
    say: Callable[[str], None]
    accelerator: object = None
    dist: Dist = field(default_factory=Dist)
    mp: str = "no"
    # data and the run's length
    model_for_data: object = None       # the model whose VAE encodes latents (vae_dtype)
    data: object = None
    report: str = ""
    steps_per_epoch: int = 1
    total_steps: int = 0
    te_steps: int = 0
    zero_terminal_snr: bool = False
    run_id: str = ""
    identity: tuple = ()                # what compute_run_id hashes, less the process count
    parent_run: str | None = None
    # the run folder
    run: RunFolder | None = None
    checkpoint: str | None = None
    start_step: int = 0
    # what trains
    tm: object = None
    unet_params: list = field(default_factory=list)
    te_params: list = field(default_factory=list)
    named: dict = field(default_factory=dict)
    trained_modules: list = field(default_factory=list)
    offloaded: list = field(default_factory=list)
    optimizer: object = None
    lr_scheduler: object = None
    noise_scheduler: object = None
    ema: object = None

    @property
    def main(self) -> bool:
        return self.dist.main


def _train(model, concepts, settings, output_root, resume, device, cb, reuse_finished, held):
    if settings.train_imagic_only:             # Imagic: edit one photo by a text (its own two-stage loop)
        from .imagic import train_imagic

        if process_info()[1] > 1:
            raise ValueError("Imagic (train_imagic_only) edits one image and trains in one process; run it without "
                             "accelerate launch / --num-processes")

        return train_imagic(model, concepts, settings, output_root, resume, device, cb, reuse_finished, held)
    job = _start(model, concepts, settings, output_root, device, cb, held)   # settings, precision, processes
    _prepare_data(job)                  # scan, class images, latent/text caches
    _plan_length(job)                   # steps per epoch, total steps, the run's identity
    if reuse_finished and resume != "new":
        reused = _reused_result(job)    # an identical run already finished: its result, no training
        if reused is not None:
            return reused
    _claim_run(job, resume)             # the interrupted run to continue (locked), if any
    _build_model(job)                   # the trained copy: adapters, precision, checkpointing, offloading
    _build_optimizer(job)               # optimizer, LR and noise schedules, EMA
    _preflight(job)                     # one step at the largest bucket and batch: does it fit the device?
    _resume_or_create_run(job, resume)  # a checkpoint's state loaded, or a new run folder
    step, last_loss = _loop(job)
    return _finish(job, step, last_loss)


# ---- stages ----------------------------------------------------------------------------------------------------
def _start(model, concepts, settings, output_root, device, cb, held) -> _Job:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from .setup.precision import mixed_precision

    settings = settings.resolved(concepts).check()
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    say = cb.log or (lambda msg: None)
    mp = mixed_precision(settings, device, say, model)
    if mp != settings.mixed_precision:      # checks that depend on it (fused_backward, frozen_dtype) see the real one
        settings.replace(mixed_precision=mp).check(check_environment=False)
    accelerator = Accelerator(mixed_precision=mp, cpu=device.type == "cpu",
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=collective_timeout())])
    device = accelerator.device if device.type != "cpu" else device
    dist = Dist(accelerator.process_index, accelerator.num_processes)
    if dist.active:
        if settings.fused_backward:
            raise ValueError("fused_backward = True steps each weight before gradients are averaged across "
                             "processes; train in one process or turn fused_backward off")
        if not dist.main:                   # one voice: rank 0 logs, shows progress and previews
            cb = TrainCallbacks(should_stop=cb.should_stop)
            say = lambda msg: None          # noqa: E731
    return _Job(model=model, concepts=concepts, settings=settings, output_root=output_root, device=device, cb=cb,
                held=held, say=say, accelerator=accelerator, dist=dist, mp=mp)


def _prepare_data(job: _Job) -> None:
    from .data.dataset import generate_missing_class_images, prepare_training_data
    from .setup.precision import vae_dtype

    model, settings, device, cb, dist = job.model, job.settings, job.device, job.cb, job.dist
    for m in (model.vae, *model.text_encoders):
        m.to(device)
    model.unet.to(device)
    # the VAE that encodes the training latents (and decodes previews) has the vae_dtype setting's precision:
    # fp16 VAEs give NaN/black images, so a half-precision model's VAE is copied to fp32 unless asked otherwise
    data_vae_dtype = vae_dtype(settings, device, job.say)
    if model.vae.dtype != data_vae_dtype:
        job.model_for_data = model.replace(vae=trainable_copy(model.vae).to(dtype=data_vae_dtype)
                                           .requires_grad_(False))
    else:
        job.model_for_data = model
    progress = (lambda d, t: cb.stage("data", d, t)) if cb.stage else None
    from_class_images = settings.prior_mode == "class_images"
    generate = from_class_images
    if dist.active and from_class_images:       # every process makes its share of the class images
        generate_missing_class_images(job.model_for_data, job.concepts, settings.data,
                                      scheduler=settings.preview_scheduler, progress=progress,
                                      should_stop=cb.should_stop, clip_skip=settings.clip_skip_or_none,
                                      log=job.say, shard=(dist.rank, dist.world), sync=dist.barrier)
        generate = False
    job.data = prepare_training_data(
        job.model_for_data, job.concepts, settings.data,
        cache_dir=os.path.join(job.output_root, "dreambooth", "cache"),
        text_encoder_trained=settings.trains_text_encoder, batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps, seed=settings.seed, progress=progress,
        should_stop=cb.should_stop, clip_skip=settings.clip_skip_or_none, use_class_images=from_class_images,
        generate_class_images=generate, class_scheduler=settings.preview_scheduler, log=job.say,
        shard=(dist.rank, dist.world), sync=dist.barrier)
    dist.barrier()                              # every process's share of a disk cache is written
    job.report = job.data.report_text()
    if dist.active:
        b, a = settings.batch_size, settings.gradient_accumulation_steps
        job.report += (f"\n{dist.world} processes: effective batch {dist.world} x {b} x {a} = {dist.world * b * a} "
                       f"examples per optimizer step; each process takes every {dist.world}th batch of an epoch, "
                       "which is padded with its first batches so that every process steps the same number of "
                       "times")


def _plan_length(job: _Job) -> None:
    settings, data, model, world = job.settings, job.data, job.model, job.dist.world
    batches_per_epoch = math.ceil(data.batches_per_epoch / world)
    job.steps_per_epoch = max(1, math.ceil(batches_per_epoch / settings.gradient_accumulation_steps))
    total_steps = settings.total_steps(data.examples_per_epoch, batches_per_epoch=batches_per_epoch)
    settings.check_run_length(total_steps)
    job.te_steps = settings.text_encoder_train_steps(total_steps) if settings.trains_text_encoder else 0
    if not settings.train_unet and job.te_steps < total_steps:
        job.say(f"train_unet is off: the run ends when the text encoder freezes, after {job.te_steps} of "
                f"{total_steps} steps (text_encoder_ratio {settings.text_encoder_ratio:g})")
        total_steps = job.te_steps
        settings.check_run_length(total_steps)          # the warm-up must fit the shortened run too
    job.total_steps = total_steps
    job.zero_terminal_snr = bool(settings.zero_terminal_snr or model.zero_terminal_snr)   # a ZTSNR base keeps it
    # a model that is itself the result of a run keeps its base's source_hash: name its weights by that run too
    job.parent_run = model.metadata.get("trained_run_id")
    model_identity = model.source_hash + (f"+run:{job.parent_run}" if job.parent_run else "")
    identity = (settings.config_hash(), [c.to_dict() for c in job.concepts],
                [item.content_hash for item in data.items], model_identity, "lora" if settings.use_lora else "full")
    job.run_id = compute_run_id(*identity, processes=world)
    job.identity = identity


def _reused_result(job: _Job):
    found = job.dist.decide(lambda: getattr(RunFolder.find(job.output_root, job.run_id, finished=True), "path", None),
                            "look for a finished identical run")
    if found is None:
        return None
    done = RunFolder(found)
    job.say(f"an identical run already finished: {done.path} (reusing its result)")
    tm, unet_params, te_params = build_trainable(job.model, job.settings)
    named = named_trainables(tm, unet_params, te_params)
    ema_state = load_weights(done.final_dir, named)
    tm = finish_model(tm, job.model, named, job.settings, ema_state, job.run_id)
    cfg = done.read_config()
    return TrainResult(tm, done.path, cfg.get("steps", job.total_steps), reused=True,
                       final_loss=cfg.get("final_loss"), report=job.report, info=cfg)


def _claim_run(job: _Job, resume) -> None:
    """The interrupted run to continue, if any: rank 0 decides (it holds the lock and cleans up what an
    interrupted save left), the others follow; an error there ends every process with rank 0's message."""
    def choose():
        run, checkpoint = resume_target(job.output_root, job.run_id, resume)
        if run is not None:
            processes = run.read_config().get("processes", 1)
            if processes != job.dist.world:
                raise ValueError(f"resume: {run.path} was trained by {processes} process(es); continue it with "
                                 f"the same number (this run has {job.dist.world}), or start a new run "
                                 "(resume 'new')")
            job.held.enter_context(run.lock())         # before anything reads or writes the run's files
            for path in run.remove_leftovers():
                job.say(f"removed {path} (left by an interrupted save)")
        elif resume == "auto":
            _say_other_process_count(job)
        return (run.path if run else None), checkpoint

    path, job.checkpoint = job.dist.decide(choose, "open the run to resume")
    job.run = RunFolder(path) if path else None


def _say_other_process_count(job: _Job) -> None:
    """resume auto found nothing to continue: say so when the same run was interrupted with another number of
    processes (its effective batch and data split differ, so it is not continued silently either way)."""
    for run in reversed(RunFolder.all_runs(job.output_root)):
        cfg = run.read_config()
        n = cfg.get("processes", 1)
        same = n != job.dist.world and cfg.get("run_id") == compute_run_id(*job.identity, processes=n)
        if same and not cfg.get("finished") and run.latest_checkpoint():
            job.say(f"resume: {run.path} has the same settings and data but was trained by {n} process(es) "
                    f"(this run has {job.dist.world}); it is kept, and continues only with {n} "
                    f"(--num-processes {n}); starting a new run")
            return


def _build_model(job: _Job) -> None:
    from .setup import precision

    model, settings, device, held = job.model, job.settings, job.device, job.held
    tm, job.unet_params, job.te_params = build_trainable(model, settings)
    job.trained_modules = ([tm.unet] if settings.train_unet else []) + (tm.text_encoders if job.te_steps else [])
    if settings.frozen_dtype == "fp8" and tm.unet is not model.unet:     # frozen UNet layers in float8, cast
        precision.apply_fp8_storage(tm.unet, precision.compute_dtype(job.mp))  # before the move: no full-size copy
        held.callback(precision.restore_fp8_storage, tm.unet, model.unet)      # on the GPU at any time
    frozen_dt = precision.frozen_weight_dtype(settings, job.mp, device)   # frozen_dtype (auto: compute's half)
    for m in owned_modules(tm, model):               # shared (received) modules keep their dtype
        m.to(device)
        if frozen_dt is not None:                     # frozen weights in half precision; trained ones as trained
            for p in m.parameters():
                if not p.requires_grad and p.dtype != precision.FP8:
                    p.data = p.data.to(frozen_dt)
    if device.type != "cpu" and tm.unet is not model.unet and settings.prior_mode != "base_model":
        model.unet.to("cpu")       # training uses its own copy: the received UNet's VRAM is free until the end
    tm = tm.replace(vae=job.model_for_data.vae, zero_terminal_snr=job.zero_terminal_snr)
    tm.vae.to(device)
    if tm.unet is not model.unet:                     # build_trainable copied it when the kernel must change
        set_attention(tm.unet, settings.attention)
    if settings.gradient_checkpointing:
        if settings.train_unet:
            tm.unet.enable_gradient_checkpointing()
        for te in (tm.text_encoders if job.te_steps else []):
            enable_text_encoder_checkpointing(te)   # non-reentrant: TE LoRA learns on transformers 4 too
    for m in job.trained_modules:
        m.train()
    job.offloaded = precision.offload_frozen(tm, settings, device, te_trained=bool(job.te_steps),
                                             text_cached=job.data.text_cache is not None,
                                             latents_cached=job.data.latent_cache is not None)
    # back where they were however the run ends: the result samples with them, and the VAE / text encoders may
    # be the received model's own (a later node samples the base model)
    held.callback(lambda: [m.to(device) for m in job.offloaded])
    job.tm = tm
    job.named = named_trainables(tm, job.unet_params, job.te_params)
    job.dist.broadcast_tensors(job.named.values())    # fresh adapters start equal on every process


def _build_optimizer(job: _Job) -> None:
    from .setup.ema import EMA
    from .setup.fused import build_training_optimizer
    from .setup.noise import build_noise_scheduler
    from .setup.optimizers import training_param_groups
    from .setup.schedulers import build_lr_scheduler

    settings = job.settings
    optimizer = build_training_optimizer(training_param_groups(job.unet_params, job.te_params, settings), settings)
    if hasattr(optimizer, "close"):
        job.held.callback(optimizer.close)            # fused_backward's hooks leave the trained weights
    job.lr_scheduler = build_lr_scheduler(optimizer, settings, job.total_steps)
    job.noise_scheduler = build_noise_scheduler(settings, job.model.prediction_type,
                                                zero_terminal_snr=job.zero_terminal_snr)
    job.ema = EMA(job.tm.unet, settings.ema_decay, on_cpu=settings.ema_on_cpu) \
        if settings.use_ema and settings.train_unet else None
    # gradients are averaged by Dist (not a DDP wrapper, see distributed.py); accelerate adds the loss scaling
    # of fp16 and the autocast of mixed precision
    if job.dist.active:       # the modules get the autocast forward, not the DDP wrapper (evaluation_mode)
        for m in job.trained_modules:
            job.accelerator.prepare_model(m, evaluation_mode=True)
        job.optimizer = job.accelerator.prepare(optimizer)
    else:     # one process, as before: the trained modules keep accelerate's autocast forward, which sampling the
        # result of a half-precision model relies on (a review found it broken without)
        job.optimizer = job.accelerator.prepare(*job.trained_modules, optimizer)[-1]


def _preflight(job: _Job) -> None:
    """Measure one forward/backward at the largest bucket with a full batch (training/preflight.py); raise
    preflight.DoesNotFit before anything is trained or written when it would not fit. Skipped where the device
    cannot report its memory (CPU)."""
    from . import preflight
    from .memory import estimate

    budget = preflight.device_budget(job.device)
    if budget is None:
        return
    item = job.data.largest_batch_plan()
    te_frozen = job.te_steps == 0

    def one_step():
        job.accelerator.backward(_micro_batch_loss(job, item, job.start_step, te_frozen))

    est = estimate(job.model, job.settings, resolution=max(item.bucket), batch=len(item.items))
    with preflight.no_optimizer_steps(job.optimizer):
        peak = preflight.measure_step(job.device, one_step)
    job.optimizer.zero_grad(set_to_none=True)
    optimizer_bytes = est.parts["optimizer"]
    need = None if peak is None else peak + optimizer_bytes
    problem = preflight.verdict(device=job.device, need=need, budget=budget, peak=peak,
                                optimizer_bytes=optimizer_bytes, bucket=item.bucket, batch=len(item.items),
                                settings=job.settings, images=job.data.examples_per_epoch, estimate_text=est.table(),
                                processes=job.dist.world)
    if job.dist.sum([float(problem is not None)], job.device)[0]:       # one process short of memory: all stop
        if problem is None:
            change, changed = preflight.next_saving(job.settings, job.data.examples_per_epoch, job.dist.world)
            problem = preflight.DoesNotFit("pre-flight: another process's step does not fit its device", changed,
                                           change or "")
        raise problem
    job.say(f"pre-flight: one step at {item.bucket[0]}x{item.bucket[1]}, batch {len(item.items)} needs "
            f"{need / 2**30:.2f} GB of {budget / 2**30:.2f} GB")


def _resume_or_create_run(job: _Job, resume) -> None:
    run, checkpoint = job.run, job.checkpoint
    if checkpoint:
        # rank 0 decides which checkpoint loads (and sets damaged ones aside); the others load the same one.
        # Only reading decides "damaged": an error while applying a readable checkpoint (e.g. out of memory) is
        # raised as it is, before the training state has been half overwritten by a fallback attempt
        loaded = [None]

        def choose():
            loaded[0] = first_loadable(run, checkpoint, lambda folder: read_own_checkpoint(folder, job.run_id),
                                       job.say, fallback=not names_a_checkpoint(resume))
            return loaded[0][1] if loaded[0] else None
        chosen = job.dist.decide(choose, "read the checkpoint to resume")
        loaded = loaded[0]
        if chosen is not None and loaded is None:
            loaded = (read_own_checkpoint(chosen, job.run_id), chosen)
        if loaded is None:
            job.say(f"no checkpoint of {run.path} loads; starting again in a new run folder (the old one is kept)")
            checkpoint = None
        else:
            ckpt, checkpoint = loaded
            job.start_step = apply_checkpoint(checkpoint, ckpt, job.named, job.optimizer, job.lr_scheduler, job.ema,
                                              scaler=job.accelerator.scaler)
            del ckpt
    if checkpoint:
        job.say(f"resuming {run.path} from step {job.start_step}")
        if job.main:
            run.truncate_loss(job.start_step)
    else:
        run = RunFolder(job.dist.decide(lambda: create_run(
            job.output_root, job.settings, job.concepts, job.data, job.model, job.run_id, job.parent_run,
            job.total_steps, job.report, job.held,
            **({"processes": job.dist.world} if job.dist.active else {})).path,
            "create the run folder"))
    job.run, job.checkpoint = run, checkpoint
    job.say(f"training {job.total_steps} steps ({job.steps_per_epoch}/epoch) in {run.path}")


def _loop(job: _Job) -> tuple[int, float | None]:
    """The optimizer steps from job.start_step to job.total_steps. Returns (steps done, last loss)."""
    import torch

    settings, cb, control, dist, device = job.settings, job.cb, job.cb.control, job.dist, job.device
    trained = [*job.unet_params, *job.te_params]
    step, last_loss = job.start_step, None
    te_frozen = job.te_steps == 0 or step >= job.te_steps
    if job.te_steps and te_frozen:
        _freeze(job.te_params)
    started, t_last, rate = time.time(), time.time(), None
    plan_cache: dict[int, list] = {}
    while step < job.total_steps:
        epoch, k = divmod(step, job.steps_per_epoch)
        if epoch not in plan_cache:
            plan_cache = {epoch: shard_plan(job.data.epoch_plan(epoch), dist.rank, dist.world)}
        accum = settings.gradient_accumulation_steps
        micro_batches = plan_cache[epoch][k * accum:(k + 1) * accum]
        seed_global_rng(step_seed(settings.seed, step), device)   # dropout and any other global draw
        step_loss = torch.zeros((), device=device)
        for plan_item in micro_batches:
            loss = _micro_batch_loss(job, plan_item, step, te_frozen) / len(micro_batches)
            if settings.fused_backward and not math.isfinite(float(loss.detach())):
                step_loss += loss.detach()        # fused_backward steps inside backward: stop before it
                break
            job.accelerator.backward(loss)
            step_loss += loss.detach()
        loss_value = dist.sum([float(step_loss)], device)[0] / dist.world     # every process sees the same loss
        if not math.isfinite(loss_value):
            last = job.run.latest_checkpoint() if job.main else None
            raise TrainingDiverged(
                f"the loss became {loss_value} at step {step + 1} (learning rate "
                f"{job.lr_scheduler.get_last_lr()[0]:.3g}); training stopped without saving this state. Last good "
                f"checkpoint: {last or 'none'} (resume from it with a lower learning_rate, or mixed_precision bf16/no)")
        dist.average_gradients(trained)
        if settings.max_grad_norm > 0:
            job.accelerator.clip_grad_norm_([p for p in trained if p.grad is not None], settings.max_grad_norm)
        lr = job.lr_scheduler.get_last_lr()[0]            # the rate this step uses: what the log shows for it
        job.optimizer.step()
        job.lr_scheduler.step()
        job.optimizer.zero_grad(set_to_none=settings.set_grads_to_none)
        if job.ema is not None:
            job.ema.step(job.tm.unet)
        step += 1
        last_loss = loss_value
        if job.te_steps and not te_frozen and step >= job.te_steps:
            _freeze(job.te_params)
            te_frozen = True
            job.say(f"text encoder frozen after step {step} (text_encoder_ratio {settings.text_encoder_ratio})")

        # ---- bookkeeping: log, progress, saves, previews, stop -----------------------------------------------
        now = time.time()
        dt, t_last = now - t_last, now
        rate = 1.0 / dt if rate is None else 0.9 * rate + 0.1 / max(dt, 1e-9)
        if job.main:
            job.run.append_loss({"step": step, "epoch": epoch + 1, "loss": loss_value, "lr": lr,
                                 "time": round(now - started, 4)})
        if cb.progress:
            eta = (job.total_steps - step) / rate if rate else None
            cb.progress({"step": step, "total": job.total_steps, "epoch": epoch + 1,
                         "epochs": math.ceil(job.total_steps / job.steps_per_epoch), "loss": loss_value, "lr": lr,
                         "it_per_s": rate, "eta_s": eta, "eta": format_eta(eta) if rate else ""})
        epoch_end = step % job.steps_per_epoch == 0 or step == job.total_steps
        saved = None   # this step's checkpoint: written once, whether requested, per epoch or on stop
        if control is not None and control.take_save_request():
            saved = _save(job, step, loss_value)
            job.say(f"saved {saved} (requested)")
        if epoch_end and step < job.total_steps:
            done_epochs = step // job.steps_per_epoch
            if settings.save_every_epochs and done_epochs % settings.save_every_epochs == 0 and saved is None:
                saved = _save(job, step, loss_value)
            if settings.preview_every_epochs and done_epochs % settings.preview_every_epochs == 0:
                _preview(job, done_epochs)
            if settings.pause_after_epochs and done_epochs % settings.pause_after_epochs == 0:
                _pause(settings.pause_seconds, cb, control, job.say)
        stop_now = (cb.should_stop is not None and cb.should_stop()) or (
            control is not None and control.should_stop(epoch_end=epoch_end))
        if dist.sum([float(stop_now)], device)[0] and step < job.total_steps:     # one stops: all stop together
            path = saved or _save(job, step, loss_value)
            if dist.active:
                mark_stopped_together()
            raise TrainingInterrupted(f"training stopped at step {step}/{job.total_steps}; resumable checkpoint: "
                                      f"{path}", job.run.path, step, path)
    return step, last_loss


def _micro_batch_loss(job: _Job, plan_item, step: int, te_frozen: bool):
    """The weighted loss of one planned batch. Each example's random draws (VAE posterior sample, noise, offset,
    timestep) come from its own generator, seeded by (seed, step, example): the same example draws the same
    values whichever batch, micro-batch or process holds it."""
    import torch

    from .models.text import encode_prompts
    from .setup.noise import (min_snr_weights, per_sample_mse, sample_noise, sample_timesteps, training_target,
                              weighted_mean_loss)

    settings, tm, model, device, sched = job.settings, job.tm, job.model, job.device, job.noise_scheduler
    gens = example_generators(settings.seed, step, plan_item.items)
    batch = job.data.load_batch(plan_item, device=device, dtype=torch.float32, generator=gens)
    with job.accelerator.autocast():
        if batch.embeds is not None:
            embeds, pooled = batch.embeds, batch.pooled
        else:
            te_out = _encode_captions(job, batch.captions, with_grad=not te_frozen)
            embeds, pooled = te_out.embeds, te_out.pooled
        latents = batch.latents
        noise = torch.cat([sample_noise(latents[i:i + 1], settings.offset_noise, g) for i, g in enumerate(gens)])
        t = torch.cat([sample_timesteps(sched, 1, g, device) for g in gens])
        noisy = sched.add_noise(latents, noise, t)
        added = {"text_embeds": pooled, "time_ids": batch.time_ids} if tm.is_sdxl else None
        pred = tm.unet(noisy, t, embeds, added_cond_kwargs=added).sample
        target = training_target(sched, latents, noise, t, model.prediction_type)
        weights = batch.loss_weights.to(device)
        if settings.prior_loss_weight is not None:
            weights = torch.where(batch.is_prior.to(device), torch.tensor(settings.prior_loss_weight, device=device),
                                  weights)
        weights = weights * min_snr_weights(sched, t, settings.min_snr_gamma, model.prediction_type)
        loss = weighted_mean_loss(per_sample_mse(pred, target), weights)
        if settings.prior_mode == "base_model":
            loss = loss + base_model_prior_loss(tm, model, model.unet, tm.unet, job.concepts, batch, noisy, t,
                                                 settings, encode_prompts, per_sample_mse, with_grad=not te_frozen)
    return loss


def _encode_captions(job: _Job, captions, with_grad: bool):
    import torch

    from .models.text import encode_tokens, tokenize

    ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    with ctx:
        return encode_tokens(job.tm, tokenize(job.tm, captions, job.settings.data.long_captions),
                             job.settings.clip_skip_or_none)


def _save(job: _Job, step: int, loss: float | None, *, final: bool = False) -> str | None:
    """A checkpoint of the training state (rank 0 writes it; the others return None)."""
    if not job.main:
        return None

    def write(folder):
        write_state(folder, job.named, job.optimizer, job.lr_scheduler, job.ema,
                    {"step": step, "run_id": job.run_id, "loss": loss, "time": time.time()},
                    scaler=job.accelerator.scaler)
    try:
        if final:
            return job.run.save_final(write)
        return job.run.save_checkpoint(step, write, keep_last=job.settings.keep_last_checkpoints)
    except OSError as e:
        last = job.run.latest_checkpoint()
        raise TrainingSaveError(f"could not save the checkpoint of step {step} in {job.run.path}: {e}. "
                                f"The previous checkpoint is intact: {last or 'none yet'}") from e


def _preview(job: _Job, epoch: int) -> None:
    """Sample each concept's prompt with the model as trained so far into the run's previews folder."""
    if not job.main:
        return
    from .sampling import generate, to_pil
    from .setup import precision

    settings = job.settings
    prompts = [c.sample_prompt or c.instance_prompt for c in job.concepts]
    for m in job.trained_modules:
        m.eval()
    res = settings.data.resolution
    with job.accelerator.autocast(), precision.frozen_on(job.device, job.offloaded):
        images = generate(job.tm, prompts, steps=settings.preview_steps, cfg=settings.preview_cfg,
                          seed=settings.seed, width=res, height=res, scheduler=settings.preview_scheduler,
                          clip_skip=settings.clip_skip_or_none, long_prompts=settings.data.long_captions)
    for m in job.trained_modules:
        m.train()
    paths = []
    for i, image in enumerate(to_pil(images)):
        path = os.path.join(job.run.previews_dir, f"epoch-{epoch:05d}_{i}.png")
        image.save(path)
        paths.append(path)
    if job.cb.preview:
        job.cb.preview(paths)


def _finish(job: _Job, step: int, last_loss: float | None) -> TrainResult:
    if job.main:
        if job.settings.preview_every_epochs:
            _preview(job, math.ceil(job.total_steps / job.steps_per_epoch))
        _save(job, step, last_loss, final=True)
        job.run.update_config(finished=True, steps=step, final_loss=last_loss,
                              finished_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    job.dist.barrier()                    # the others read the finished run's config after rank 0 wrote it
    result = finish_model(job.tm, job.model, job.named, job.settings,
                           job.ema.state_dict() if job.ema is not None else None, job.run_id)
    return TrainResult(result, job.run.path, step, final_loss=last_loss, report=job.report,
                       info=job.run.read_config())


def _freeze(params):
    for p in params:
        p.requires_grad_(False)
        p.grad = None


def _pause(seconds: float, cb, control, say):
    say(f"pausing {seconds:.0f} s")
    end = time.time() + seconds
    while time.time() < end:
        if (cb.should_stop and cb.should_stop()) or (control is not None and control.stop_requested):
            return
        time.sleep(min(0.2, max(0.0, end - time.time())))


# --------------------------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------------------------
