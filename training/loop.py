"""The step loop of a DreamBooth run, and what it does between steps: the loss of one planned batch, checkpoints,
previews, pauses, stops. trainer.py's stages fill a `Job` and hand it here; `run_steps` returns at the last step
(trainer.py finishes the run) or raises TrainingInterrupted / TrainingDiverged / TrainingSaveError.

One optimizer step = `gradient_accumulation_steps` planned batches. Every random draw of step s comes from
generators seeded by (seed, s) (setup/noise.py), and the data order of an epoch is a function of (seed, epoch): a run
resumed from the checkpoint of step s therefore continues exactly where the uninterrupted run would have been.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from .best import protected, validation_step
from .checkpoints import save_training_state
from .control import (StepClock, TrainCallbacks, TrainingDiverged, TrainingInterrupted, log_step, requested_save,
                      stop_requested)
from .distributed import Dist, mark_stopped_together, shard_plan
from .runs import RunFolder
from .setup.noise import base_model_prior_loss, example_generators, seed_global_rng, step_seed


@dataclass
class Job:
    """One training run, filled in stage by stage by trainer.py (the stages read and write its fields)."""

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
    # validation (validation.py), TensorBoard (board.py)
    validation: object = None
    validation_data: object = None      # the prepared images of a validation folder
    board: object = None

    @property
    def main(self) -> bool:
        return self.dist.main


def run_steps(job: Job) -> tuple[int, float | None]:
    """The optimizer steps from job.start_step to job.total_steps. Returns (steps done, last loss)."""
    settings, cb, control, dist, device = job.settings, job.cb, job.cb.control, job.dist, job.device
    step, last_loss = job.start_step, None
    te_frozen = job.te_steps == 0 or step >= job.te_steps
    if job.te_steps and te_frozen:
        _freeze(job.te_params)
    clock = StepClock()
    plan_cache: dict[int, list] = {}
    if job.validation is not None and step == 0:
        validation_step(job, 0, None)                       # the base model's numbers: the baseline
    while step < job.total_steps:
        epoch, k = divmod(step, job.steps_per_epoch)
        if epoch not in plan_cache:
            plan_cache = {epoch: shard_plan(job.data.epoch_plan(epoch), dist.rank, dist.world)}
        accum = settings.gradient_accumulation_steps
        micro_batches = plan_cache[epoch][k * accum:(k + 1) * accum]
        lrs = job.lr_scheduler.get_last_lr()              # the rates this step uses: what the log shows for it
        lr = lrs[0]
        loss_value = train_step(job, step, micro_batches, te_frozen)
        step += 1
        last_loss = loss_value
        if job.te_steps and not te_frozen and step >= job.te_steps:
            _freeze(job.te_params)
            te_frozen = True
            job.say(f"text encoder frozen after step {step} (text_encoder_ratio {settings.text_encoder_ratio})")

        # ---- bookkeeping: log, progress, saves, previews, stop -----------------------------------------------
        log_step(job.run, clock, cb.progress, step=step, total=job.total_steps, loss=loss_value, lr=lr,
                 logged={"epoch": epoch + 1}, shown={"epoch": epoch + 1, "epochs": math.ceil(
                     job.total_steps / job.steps_per_epoch)}, main=job.main)
        if job.board is not None:
            job.board.step(step, loss_value, lrs, clock.rate)
        epoch_end = step % job.steps_per_epoch == 0 or step == job.total_steps
        # this step's checkpoint: written once, whether requested, per epoch or on stop
        saved = requested_save(control, lambda: save_state(job, step, loss_value), job.say)
        if epoch_end and step < job.total_steps:
            done_epochs = step // job.steps_per_epoch
            if settings.save_every_epochs and done_epochs % settings.save_every_epochs == 0 and saved is None:
                saved = save_state(job, step, loss_value)
            if settings.preview_every_epochs and done_epochs % settings.preview_every_epochs == 0:
                preview(job, done_epochs)
            if settings.pause_after_epochs and done_epochs % settings.pause_after_epochs == 0:
                _pause(settings.pause_seconds, cb, control, job.say)
        if job.validation is not None and validation_step(job, step, saved):
            break                                           # early_stop: the run ends here, finished
        stop_now = stop_requested(cb, epoch_end)
        if dist.sum([float(stop_now)], device)[0] and step < job.total_steps:     # one stops: all stop together
            path = saved or save_state(job, step, loss_value)
            if dist.active:
                mark_stopped_together()
            raise TrainingInterrupted(f"training stopped at step {step}/{job.total_steps}; resumable checkpoint: "
                                      f"{path}", job.run.path, step, path)
    return step, last_loss


def train_step(job: Job, step: int, micro_batches, te_frozen: bool, *, read_loss: bool = True) -> float | None:
    """Optimizer step `step` (0-based) on its planned micro-batches: forward / backward of each, gradients
    averaged across processes, clipped, the optimizer and LR steps, zero_grad, EMA. Returns the loss every process
    sees. Raises TrainingDiverged on a non-finite loss, before the optimizer steps.

    read_loss False: the loss is neither read nor checked (returns None): the memory accounting
    (memory_measure.py) runs this step on fake tensors, which hold no values."""
    import torch

    settings, dist, device = job.settings, job.dist, job.device
    trained = [*job.unet_params, *job.te_params]
    seed_global_rng(step_seed(settings.seed, step), device)   # dropout and any other global draw
    step_loss = torch.zeros((), device=device)
    for plan_item in micro_batches:
        loss = micro_batch_loss(job, plan_item, step, te_frozen) / len(micro_batches)
        if read_loss and settings.fused_backward and not math.isfinite(float(loss.detach())):
            step_loss += loss.detach()        # fused_backward steps inside backward: stop before it
            break
        job.accelerator.backward(loss)
        step_loss += loss.detach()
    loss_value = None
    if read_loss:
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
    job.optimizer.step()
    job.lr_scheduler.step()
    job.optimizer.zero_grad(set_to_none=settings.set_grads_to_none)
    if job.ema is not None:
        job.ema.step(job.tm.unet)
    return loss_value


def micro_batch_loss(job: Job, plan_item, step: int, te_frozen: bool):
    """The weighted loss of one planned batch. Each example's random draws (VAE posterior sample, noise, offset,
    timestep) come from its own generator, seeded by (seed, step, example): the same example draws the same
    values whichever batch, micro-batch or process holds it."""
    import torch

    from .models.text import encode_prompts
    from .setup.masked_loss import per_sample_loss
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
        loss = weighted_mean_loss(per_sample_loss(pred, target, batch.masks, settings), weights)   # masked_loss
        if settings.prior_mode == "base_model":
            loss = loss + base_model_prior_loss(tm, model, model.unet, tm.unet, job.concepts, batch, noisy, t,
                                                settings, encode_prompts, per_sample_mse, with_grad=not te_frozen)
    return loss


def _encode_captions(job: Job, captions, with_grad: bool):
    import torch

    from .models.text import encode_tokens, tokenize

    ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    with ctx:
        return encode_tokens(job.tm, tokenize(job.tm, captions, job.settings.data.long_captions),
                             job.settings.clip_skip_or_none)


def save_state(job: Job, step: int, loss: float | None, *, final: bool = False) -> str | None:
    """A checkpoint of the training state (rank 0 writes it; the others return None)."""
    if not job.main:
        return None
    return save_training_state(job.run, step, {"step": step, "run_id": job.run_id, "loss": loss, "time": time.time()},
                               job.named, job.optimizer, job.lr_scheduler, job.ema, job.accelerator.scaler,
                               final=final, keep_last=job.settings.keep_last_checkpoints, keep=protected(job))


def preview(job: Job, epoch: int) -> None:
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
