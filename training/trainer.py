"""DreamBooth training: `train()`, then the stages of a run in the order they happen. Read it top to bottom:
start -> data (and the validation images) -> length -> (reuse a finished run) -> claim the run to continue ->
validation's reference (the base's predictions and images) -> model -> optimizer -> pre-flight -> resume or create
the run folder -> the step loop (loop.py; validation.py / best.py between steps) -> finish (keep_best's choice).

The stages fill one `loop.Job`; checkpoints are read and written by checkpoints.py, the trainable copy is
setup/trainable.py's. Imagic (train_imagic_only) branches off in `_train` to imagic.py, on the same pieces.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import time

from .best import conclude
from .checkpoints import (apply_checkpoint, check_resume_folder, claim_run, create_run, load_weights,
                          loadable_checkpoint, read_own_checkpoint, restore_edited_config, resume_target,
                          unreadable_runs)
from .compat import enable_text_encoder_checkpointing
from .control import TrainCallbacks, TrainingDiverged, TrainingInterrupted, TrainingSaveError, TrainResult
from .data.masks import content_hashes
from .devices import is_accelerator, to_device, to_host
from .distributed import Dist, collective_timeout, process_info
from .loop import Job, micro_batch_loss, preview, run_steps, save_state
from .runs import RunFolder, compute_run_id
from .setup.trainable import (build_trainable, finish_model, named_trainables, owned_modules, set_attention,
                              with_data_vae)
from .validation import adapter_reference, plan_validation, prepare_reference, resume_records

# train()'s callbacks, result and exceptions are part of its interface: callers import them from here
__all__ = ["train", "TrainCallbacks", "TrainResult", "TrainingInterrupted", "TrainingDiverged", "TrainingSaveError"]


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
                with torch.inference_mode(False), fresh_accelerate_state(), torch.random.fork_rng(
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


@contextlib.contextmanager
def fresh_accelerate_state():
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


def _train(model, concepts, settings, output_root, resume, device, cb, reuse_finished, held):
    if settings.train_imagic_only:             # Imagic: edit one photo by a text (its own two-stage loop)
        from .imagic import train_imagic

        if process_info()[1] > 1:
            raise ValueError("Imagic (train_imagic_only) edits one image and trains in one process; run it without "
                             "accelerate launch / --num-processes")

        return train_imagic(model, concepts, settings, output_root, resume, device, cb, reuse_finished, held)
    job = _start(model, concepts, settings, output_root, device, cb, held)   # settings, precision, processes
    job.dist.decide(lambda: check_resume_folder(resume, job.dist.world),   # a refused resume folder: before the
                    "open the run to resume")                                 # data writes any cache
    _prepare_data(job)                  # scan, class images, latent/text caches
    _plan_length(job)                   # steps per epoch, total steps, the run's identity
    if reuse_finished and resume != "new":
        reused = _reused_result(job)    # an identical run already finished: its result, no training
        if reused is not None:
            return reused
    _claim_run(job, resume)             # the interrupted run to continue (locked), if any
    prepare_reference(job)              # validation: fixed noise, the base model's predictions and images
    build_training(job)                 # the trained copy (adapters, precision, offloading) and its optimizer
    adapter_reference(job)              # validation, LoRA: the base's predictions are the adapters-off model's
    _preflight(job)                     # one step at the largest bucket and batch: does it fit the device?
    _resume_or_create_run(job, resume)  # a checkpoint's state loaded, or a new run folder
    try:
        step, last_loss = run_steps(job)
    except TrainingInterrupted as stopped:   # a requested stop: the model it saved goes with it (run not finished)
        stopped.result = _stopped_result(job, stopped.step)
        raise
    return _finish(job, step, last_loss)


# ---- stages ----------------------------------------------------------------------------------------------------
def _start(model, concepts, settings, output_root, device, cb, held) -> Job:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from .setup.precision import check_device_precision, mixed_precision

    settings = settings.resolved(concepts).check()
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    say = cb.log or (lambda msg: None)
    mp = mixed_precision(settings, device, say, model)
    check_device_precision(settings, mp, device)    # checks that depend on it (fused_backward, frozen_dtype)
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
    return Job(model=model, concepts=concepts, settings=settings, output_root=output_root, device=device, cb=cb,
                held=held, say=say, accelerator=accelerator, dist=dist, mp=mp)


def place_model(job: Job) -> None:
    """The received model on the device for data preparation: the VAE and text encoders (which encode the data),
    the UNet only when a concept asks for class images (missing ones are generated); and the VAE that encodes the
    data (job.model_for_data, in vae_dtype)."""
    from .setup.precision import vae_dtype

    model = job.model
    for m in (model.vae, *model.text_encoders):
        to_device(m, job.device)
    if job.settings.prior_mode == "class_images" and any(c.num_class_images_per_image for c in job.concepts):
        to_device(model.unet, job.device)             # missing class images are generated with it
    job.model_for_data = with_data_vae(model, vae_dtype(job.settings, job.device, job.say))


def _prepare_data(job: Job) -> None:
    from .data.prepare import generate_missing_class_images, prepare_training_data

    model, settings, device, cb, dist = job.model, job.settings, job.device, job.cb, job.dist
    place_model(job)
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
        shard=(dist.rank, dist.world), sync=dist.barrier, masks=settings.masked_loss)
    dist.barrier()                              # every process's share of a disk cache is written
    held_out = plan_validation(job)             # validation images; held-out ones leave the training data
    job.report = job.data.report_text() + held_out
    if dist.active:
        b, a = settings.batch_size, settings.gradient_accumulation_steps
        job.report += (f"\n{dist.world} processes: effective batch {dist.world} x {b} x {a} = {dist.world * b * a} "
                       f"examples per optimizer step; each process takes every {dist.world}th batch of an epoch, "
                       "which is padded with its first batches so that every process steps the same number of "
                       "times")


def _plan_length(job: Job) -> None:
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
                content_hashes(data.items), model_identity, "lora" if settings.use_lora else "full")
    job.run_id = compute_run_id(*identity, processes=world)
    job.identity = identity


def _reused_result(job: Job):
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
    if cfg.get("best"):
        tm = tm.replace(metadata={**tm.metadata, "best_checkpoint": cfg["best"]})
    return TrainResult(tm, done.path, cfg.get("steps", job.total_steps), reused=True,
                       final_loss=cfg.get("final_loss"), report=job.report, info=cfg)


def _claim_run(job: Job, resume) -> None:
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
            claim_run(run, job.held, job.say)
        elif resume == "auto":
            _say_other_process_count(job)
            for unreadable, why in unreadable_runs(job.output_root, job.run_id):
                job.say(f"resume: {unreadable.path} holds a checkpoint of this run, but its {why}: it is kept and "
                        "not continued; starting a new run (restore its config.json to continue it)")
        return (run.path if run else None), checkpoint

    path, job.checkpoint = job.dist.decide(choose, "open the run to resume")
    job.run = RunFolder(path) if path else None


def _say_other_process_count(job: Job) -> None:
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


def build_training(job: Job) -> None:
    """What trains and how, on a Job whose model is placed and whose data is ready: the trained copy (adapters,
    precision, checkpointing, offloading; `_build_model`), then the optimizer, LR and noise schedules and EMA
    (`_build_optimizer`). The memory accounting (memory_measure.py) builds a run with it too."""
    _build_model(job)
    _build_optimizer(job)


def _build_model(job: Job) -> None:
    from .setup import precision

    model, settings, device, held = job.model, job.settings, job.device, job.held
    # the received UNet and text encoders wait on the host while training's copies of them are made (there, in
    # their loaded precision: never a second full-size model on the accelerator), unless the base model's own
    # predictions are needed (prior_mode base_model); what training shares with them comes back
    parked = [model.unet, *model.text_encoders] if (is_accelerator(device) and
                                                    settings.prior_mode != "base_model") else []
    for m in parked:
        to_host(m)
    tm, job.unet_params, job.te_params = build_trainable(model, settings)
    job.trained_modules = ([tm.unet] if settings.train_unet else []) + (tm.text_encoders if job.te_steps else [])
    if settings.frozen_dtype == "fp8" and tm.unet is not model.unet:     # frozen UNet layers in float8, cast
        precision.apply_fp8_storage(tm.unet, precision.compute_dtype(job.mp))  # before the move: no full-size copy
        held.callback(precision.restore_fp8_storage, tm.unet, model.unet)      # on the GPU at any time
    frozen_dt = precision.frozen_weight_dtype(settings, job.mp, device)   # frozen_dtype (auto: compute's half)
    owned = owned_modules(tm, model)
    for m in owned:                                   # shared (received) modules keep their dtype
        if frozen_dt is not None:                     # frozen weights in half precision; trained ones as trained
            for p in m.parameters():
                if not p.requires_grad and p.dtype != precision.FP8:
                    p.data = p.data.to(frozen_dt)
    tm = tm.replace(vae=job.model_for_data.vae, zero_terminal_snr=job.zero_terminal_snr)
    if tm.unet is not model.unet:                     # build_trainable copied it when the kernel must change
        set_attention(tm.unet, settings.attention)
    if settings.gradient_checkpointing:
        if settings.train_unet:
            tm.unet.enable_gradient_checkpointing()
        for te in (tm.text_encoders if job.te_steps else []):
            enable_text_encoder_checkpointing(te)   # non-reentrant: TE LoRA learns on transformers 4 too
    for m in job.trained_modules:
        m.train()
    # what the steps do not run leaves the accelerator before what they train arrives (data preparation's VAE
    # and training's copies never share it)
    job.offloaded = precision.offload_frozen(tm, settings, device, te_trained=bool(job.te_steps),
                                             text_cached=job.data.text_cache is not None,
                                             latents_cached=job.data.latent_cache is not None)
    # back where they were however the run ends: the result samples with them, and the VAE / text encoders may
    # be the received model's own (a later node samples the base model)
    held.callback(lambda: [m.to(device) for m in job.offloaded])
    used = [m for m in (tm.unet, *tm.text_encoders, tm.vae) if not any(m is o for o in job.offloaded)]
    if parked and not any(model.vae is m for m in (tm.vae, *job.offloaded)):   # the data's VAE is a copy
        to_host(model.vae)
        parked.append(model.vae)
    # the received model's parts are back on the device when the run ends, as data preparation left them (the
    # received UNet goes back to where it was before training: train())
    held.callback(lambda: [to_device(m, device) for m in parked
                           if m is not model.unet and not any(m is u for u in used)])
    for m in [*owned, *parked, tm.vae]:
        if any(m is u for u in used):                 # cast first: no full-precision copy ever reaches it
            to_device(m, device)
    job.tm = tm
    job.named = named_trainables(tm, job.unet_params, job.te_params)
    job.dist.broadcast_tensors(job.named.values())    # fresh adapters start equal on every process


def _build_optimizer(job: Job) -> None:
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


def _preflight(job: Job) -> None:
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
        job.accelerator.backward(micro_batch_loss(job, item, job.start_step, te_frozen))

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


def _resume_or_create_run(job: Job, resume) -> None:
    run, checkpoint = job.run, job.checkpoint
    if checkpoint:
        # rank 0 decides which checkpoint loads (and sets damaged ones aside); the others load the same one.
        # Only reading decides "damaged": an error while applying a readable checkpoint (e.g. out of memory) is
        # raised as it is, before the training state has been half overwritten by a fallback attempt
        loaded = [None]

        def choose():
            loaded[0] = loadable_checkpoint(run, checkpoint, job.run_id, resume, job.say)
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
            restore_edited_config(run, {"run_id": job.run_id, "settings": job.settings.to_dict(),
                                        "total_steps": job.total_steps},
                                  job.say)
    else:
        run = RunFolder(job.dist.decide(lambda: create_run(
            job.output_root, job.settings, job.concepts, job.data, job.model, job.run_id, job.parent_run,
            job.total_steps, job.report, job.held,
            **({"processes": job.dist.world} if job.dist.active else {})).path,
            "create the run folder"))
    job.run, job.checkpoint = run, checkpoint
    if checkpoint:
        resume_records(job)             # validation.jsonl up to the checkpoint's step, the best so far
    if job.main and job.settings.tensorboard:
        from .board import open_board

        job.board = open_board(run.path, job.start_step)
        job.held.callback(job.board.close)
    job.say(f"training {job.total_steps} steps ({job.steps_per_epoch}/epoch) in {run.path}")


def _stopped_result(job: Job, step: int) -> TrainResult:
    """The model of a stopped run as its checkpoint of `step` holds it; the run folder stays unfinished (resumable)."""
    losses = job.run.read_loss() if job.main else []
    model = finish_model(job.tm, job.model, job.named, job.settings,
                         job.ema.state_dict() if job.ema is not None else None, job.run_id)
    best = getattr(job.validation, "best", None)
    if best:                              # keep_best's choice so far: `which = best` works on a stopped run too
        model = model.replace(metadata={**model.metadata, "best_checkpoint": best})
    return TrainResult(model, job.run.path, step, final_loss=losses[-1].get("loss") if losses else None,
                       report=job.report, info={"stopped": True})


def _finish(job: Job, step: int, last_loss: float | None) -> TrainResult:
    if job.main:
        if job.settings.preview_every_epochs:
            preview(job, math.ceil(job.total_steps / job.steps_per_epoch))
        final_path = save_state(job, step, last_loss, final=True)
        best = conclude(job, step, final_path)    # keep_best: the final state is a candidate too
        if best:
            job.report += (f"\nbest checkpoint: step {best['step']}, {best['checkpoint']} (subject loss "
                           f"{best['loss']:.4g}, prior drift {best['prior_drift']:.4g}; {best['rule']})")
        job.run.update_config(finished=True, steps=step, final_loss=last_loss,
                              finished_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    job.dist.barrier()                    # the others read the finished run's config after rank 0 wrote it
    result = finish_model(job.tm, job.model, job.named, job.settings,
                          job.ema.state_dict() if job.ema is not None else None, job.run_id)
    info = job.run.read_config()
    if info.get("best"):                  # SaveLoRA / SaveCheckpoint `which = best` find it here
        result = result.replace(metadata={**result.metadata, "best_checkpoint": info["best"]})
    return TrainResult(result, job.run.path, step, final_loss=last_loss, report=job.report, info=info)
