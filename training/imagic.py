"""Imagic (Kawar et al. 2023, "Imagic: Text-Based Real Image Editing with Diffusion Models"): edit one real photo
by a target text. The A1111 extension's "Train Imagic Only".

Read `train_imagic()` top to bottom:

    stage 1  the target text's embedding e_tgt is optimised towards the photo (UNet and text encoder frozen, plain
             diffusion loss on the photo's latents; the embedding is the only trainable tensor) -> e_opt
    stage 2  the UNet (all of it, or a LoRA with use_lora) is fine-tuned on the photo, conditioned on the frozen e_opt
    sampling e = alpha * e_tgt + (1 - alpha) * e_opt: alpha 0 reconstructs the photo, 1 is the edit, > 1 pushes on
             (training.sampling.generate's imagic_alpha; the prompt text is not used)

The trained SDModel carries both embeddings in `extras` (IMAGIC_KEYS, (1, 77, D); SDXL also the pooled ones), so
the checkpoint and diffusers writers store them as extra tensors and loading brings them back; a LoRA gets a
sidecar `<name>.imagic.safetensors` (`save_sidecar` / `load_sidecar`); all of that is models/imagic_embeddings.py.

One run = imagic_embed_steps + imagic_unet_steps optimizer steps, counted as one global step; step s draws its noise
and timestep from generators seeded by (seed, s) exactly like loop.py, and a checkpoint records the stage and the
global step, so a run resumed in either stage continues bit-identically (on CPU). It runs on the trainer's pieces:
run folders and checkpoints (claim, resume, save: checkpoints.py), seeds (setup/noise.py), the trainable model
(setup/trainable.py), the optimizers, and the per-step log, progress, save and stop checks (control.py).
"""
from __future__ import annotations

import math
import os
import time

from .checkpoints import (apply_checkpoint, check_resume_folder, claim_run, create_run, load_weights,
                          loadable_checkpoint, restore_edited_config, resume_target, unreadable_runs,
                          save_training_state)
from .control import (StepClock, TrainingDiverged, TrainingInterrupted, TrainResult, log_step, requested_save,
                      stop_requested)
from .models.imagic_embeddings import (IMAGIC_KEYS, OPTIMIZED_KEY, OPTIMIZED_POOLED_KEY, SIDECAR_SUFFIX, TARGET_KEY,
                                       TARGET_POOLED_KEY, imagic_tensors, interpolated, is_imagic, load_sidecar,
                                       save_sidecar, sidecar_path, with_imagic)
from .runs import RunFolder, compute_run_id
from .settings import SettingsError
from .setup.noise import seed_global_rng, step_seed
from .setup.trainable import (build_trainable, finish_model, has_inference_tensors, named_trainables, owned_modules,
                              set_attention, trainable_copy, with_data_vae)


# --------------------------------------------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------------------------------------------
def concept_problems(concepts) -> list[str]:
    """Imagic edits one photo: exactly one concept with exactly one instance image and a target text."""
    from .data.images import list_image_files

    if len(concepts) != 1:
        return [f"train_imagic_only: Imagic edits one photo, but {len(concepts)} concepts are connected; connect "
                "exactly one ConceptDataset holding one image"]
    c = concepts[0]
    p = []
    folder = c.instance_dir
    if not folder.strip() or not os.path.isdir(folder):
        p.append(f"train_imagic_only: instance_dir {folder!r} is not an existing folder; put the one photo to edit "
                 "in a folder and name it")
    else:
        images, _ = list_image_files(folder)
        if len(images) != 1:
            shown = ", ".join(os.path.basename(x) for x in images[:5]) + (", ..." if len(images) > 5 else "")
            p.append(f"train_imagic_only: instance_dir {folder} holds {len(images)} images"
                     + (f" ({shown})" if images else "")
                     + "; Imagic edits exactly one photo: leave only that image in the folder")
    if not c.instance_prompt.strip() or c.instance_prompt.strip() == "[filewords]":
        p.append("train_imagic_only: instance_prompt is the target text of the edit (e.g. 'a photo of a sitting "
                 f"dog'), got {c.instance_prompt!r}; write the text")
    return p


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------
def train_imagic(model, concepts, settings, output_root, resume, device, cb, reuse_finished, held) -> TrainResult:
    """Called by trainer._train (inside its inference_mode(False) / accelerate-state / RNG-fork context) when
    settings.train_imagic_only; same arguments, same TrainResult."""
    import torch
    from accelerate import Accelerator
    from torch.optim.lr_scheduler import LambdaLR

    from .data.prepare import prepare_training_data
    from .models.text import encode_prompts
    from .setup.noise import build_noise_scheduler, per_sample_mse, sample_noise, sample_timesteps, training_target
    from .setup.optimizers import build_optimizer, training_param_groups
    from .setup.precision import mixed_precision, vae_dtype
    from .setup.schedulers import build_lr_scheduler

    say = cb.log or (lambda msg: None)
    # ---- 0. every problem at once, before any work ---------------------------------------------------------------
    problems = concept_problems(concepts)
    try:
        settings = settings.resolved(concepts).check()
    except SettingsError as e:
        problems = e.problems + problems
    if not problems:
        problems = settings.run_length_problems(settings.imagic_unet_steps, " (imagic_unet_steps)")
    if problems:
        raise SettingsError(problems)
    ignored = [name for name, on in (("use_ema", settings.use_ema), ("random_flip", settings.data.random_flip),
                                     ("caption_dropout", settings.data.caption_dropout > 0),
                                     ("shuffle_tags", settings.data.shuffle_tags),
                                     ("text_encoder_ratio", settings.text_encoder_ratio > 0)) if on]
    if ignored:
        verb = "does" if len(ignored) == 1 else "do"
        say(f"Imagic: {', '.join(ignored)} {verb} not apply (one photo, frozen text encoder); ignored")
    # the UNet stage as an ordinary run of trainer.py's machinery: UNet only, at imagic_unet_lr
    unet_settings = settings.replace(learning_rate=settings.imagic_unet_lr, text_encoder_ratio=0.0, train_unet=True,
                                     use_ema=False, prior_mode="class_images",
                                     data=settings.data.replace(random_flip=False, caption_dropout=0.0,
                                                                shuffle_tags=False))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    mp = mixed_precision(settings, device, say, model)
    accelerator = Accelerator(mixed_precision=mp, cpu=device.type == "cpu")
    device = accelerator.device if device.type != "cpu" else device
    main = accelerator.is_main_process
    if accelerator.num_processes > 1:
        raise ValueError("train_imagic_only edits one photo and runs in one process; start it without "
                         "accelerate launch")

    # ---- 1. data: the one photo, its latents (cached like any run's) -----------------------------------------
    check_resume_folder(resume)         # a refused resume folder: before the cache is written
    for m in (model.vae, *model.text_encoders, model.unet):
        m.to(device)
    model_for_data = with_data_vae(model, vae_dtype(settings, device, say))
    data = prepare_training_data(
        model_for_data, concepts, unet_settings.data, cache_dir=os.path.join(output_root, "dreambooth", "cache"),
        text_encoder_trained=True, batch_size=1, gradient_accumulation_steps=1, seed=settings.seed,
        progress=(lambda d, t: cb.stage("data", d, t)) if cb.stage else None, should_stop=cb.should_stop,
        clip_skip=settings.clip_skip_or_none, use_class_images=False, generate_class_images=False, log=say)
    report = data.report_text()
    plan = data.epoch_plan(0)[0]                        # the one photo, never flipped
    target_text = data.caption_for(plan, 0)
    embed_steps, unet_steps = settings.imagic_embed_steps, settings.imagic_unet_steps
    total_steps = embed_steps + unet_steps
    parent_run = model.metadata.get("trained_run_id")
    model_identity = model.source_hash + (f"+run:{parent_run}" if parent_run else "")
    run_id = compute_run_id(settings.config_hash(), [c.to_dict() for c in concepts],
                            [item.content_hash for item in data.items], model_identity,
                            "imagic-lora" if settings.use_lora else "imagic-full")

    # ---- 2. the model: the trainable copy (setup/trainable.py); the embeddings ------------------------------
    tm, unet_params, _ = build_trainable(model, unet_settings)
    if tm.unet is model.unet or has_inference_tensors(tm.unet):
        tm = tm.replace(unet=trainable_copy(tm.unet))    # stage 1 backpropagates through it
    if tm.unet is not model.unet:
        set_attention(tm.unet, settings.attention)
    tm = tm.replace(vae=model_for_data.vae)
    for m in owned_modules(tm, model):
        m.to(device)
    tm.vae.to(device)
    if settings.gradient_checkpointing:
        tm.unet.enable_gradient_checkpointing()
    unet_named = named_trainables(tm, unet_params, [])
    with torch.no_grad():
        target = encode_prompts(tm, [target_text], settings.clip_skip_or_none, settings.data.long_captions)
    e_tgt = target.embeds.detach().float()
    p_tgt = target.pooled.detach().float() if target.pooled is not None else None
    e_opt = torch.nn.Parameter(e_tgt.clone())
    embedding = {OPTIMIZED_KEY: e_opt}
    if p_tgt is not None:
        embedding[OPTIMIZED_POOLED_KEY] = torch.nn.Parameter(p_tgt.clone())
    p_opt = embedding.get(OPTIMIZED_POOLED_KEY)
    zero_terminal_snr = bool(settings.zero_terminal_snr or model.zero_terminal_snr)
    noise_scheduler = build_noise_scheduler(settings, model.prediction_type, zero_terminal_snr=zero_terminal_snr)
    tm = tm.replace(zero_terminal_snr=zero_terminal_snr)

    def carrying_embeddings(m):
        extras = {**m.extras, TARGET_KEY: e_tgt.cpu(), OPTIMIZED_KEY: e_opt.detach().float().cpu().clone()}
        if p_opt is not None:
            extras.update({TARGET_POOLED_KEY: p_tgt.cpu(), OPTIMIZED_POOLED_KEY: p_opt.detach().float().cpu().clone()})
        return m.replace(extras=extras, metadata={**m.metadata, "imagic": {"target_text": target_text}})

    def result_model(named):
        out = carrying_embeddings(finish_model(tm, model, named, unet_settings, None, run_id))
        return out.replace(metadata={**out.metadata, "training": settings.result_dict()})

    # ---- 3. a finished identical run is reused; an interrupted one resumed ---------------------------------
    if reuse_finished and resume != "new":
        done = RunFolder.find(output_root, run_id, finished=True)
        if done is not None:
            say(f"an identical run already finished: {done.path} (reusing its result)")
            named = {**embedding, **unet_named}
            load_weights(done.final_dir, named)            # the weights only (no optimizer state is read)
            cfg = done.read_config()
            return TrainResult(result_model(named), done.path, cfg.get("steps", total_steps), reused=True,
                               final_loss=cfg.get("final_loss"), report=report, info=cfg)
    run, checkpoint = resume_target(output_root, run_id, resume)
    if run is not None and main:
        claim_run(run, held, say)
    if run is None and resume == "auto" and main:
        for unreadable, why in unreadable_runs(output_root, run_id):
            say(f"resume: {unreadable.path} holds a checkpoint of this run, but its {why}: it is kept and not "
                "continued; starting a new run (restore its config.json to continue it)")

    # ---- 4. the two stages' optimizers (stage 2's is built when it starts) -----------------------------------
    class Stage:
        def __init__(self, number, named, optimizer, lr_scheduler):
            self.number, self.named, self.optimizer, self.lr_scheduler = number, named, optimizer, lr_scheduler

    def embedding_stage():
        opt = torch.optim.Adam(list(embedding.values()), lr=settings.imagic_embed_lr)   # the paper's optimizer
        return Stage(1, dict(embedding), accelerator.prepare(opt), LambdaLR(opt, _constant))

    def unet_stage():
        for p in embedding.values():
            p.requires_grad_(False)
        tm.unet.requires_grad_(False)
        for p in unet_params:
            p.requires_grad_(True)
        tm.unet.train()
        opt = build_optimizer(training_param_groups(unet_params, [], unet_settings), unet_settings)
        return Stage(2, {**embedding, **unet_named}, accelerator.prepare(opt),
                     build_lr_scheduler(opt, unet_settings, unet_steps))

    tm.unet.requires_grad_(False)
    tm.unet.eval()
    stage = embedding_stage()
    start_step = 0
    if checkpoint:
        loaded = loadable_checkpoint(run, checkpoint, run_id, resume, say, set_aside=main)
        if loaded is None:
            say(f"no checkpoint of {run.path} loads; starting again in a new run folder (the old one is kept)")
            checkpoint = None
        else:
            ckpt, checkpoint = loaded
            if int(ckpt["state"].get("stage", 1)) == 2:      # the checkpoint's stage decides what it holds
                stage = unet_stage()
            start_step = apply_checkpoint(checkpoint, ckpt, stage.named, stage.optimizer, stage.lr_scheduler, None,
                                          scaler=accelerator.scaler)
    if checkpoint:
        say(f"resuming {run.path} from step {start_step} (Imagic stage {stage.number})")
        if main:
            run.truncate_loss(start_step)
            restore_edited_config(run, {"run_id": run_id, "settings": settings.to_dict(),
                                        "total_steps": total_steps}, say)
    elif main:
        run = create_run(output_root, settings, concepts, data, model, run_id, parent_run, total_steps, report, held,
                         imagic={"target_text": target_text, "embed_steps": embed_steps, "unet_steps": unet_steps})
    say(f"Imagic: {embed_steps} embedding steps + {unet_steps} UNet steps for {target_text!r} in {run.path}")

    def save(step: int, loss, *, final: bool = False) -> str | None:
        if not main:
            return None
        state = {"step": step, "stage": stage.number, "stage_step": step - (embed_steps if stage.number == 2 else 0),
                 "run_id": run_id, "loss": loss, "time": time.time()}
        return save_training_state(run, step, state, stage.named, stage.optimizer, stage.lr_scheduler, None,
                                   accelerator.scaler, final=final, keep_last=settings.keep_last_checkpoints)

    def preview(name: str, alphas):
        if not (main and settings.preview_every_epochs):
            return
        from .sampling import generate, to_pil

        was_training = tm.unet.training
        tm.unet.eval()
        shown = carrying_embeddings(tm)
        res = settings.data.resolution
        paths = []
        for alpha in alphas:
            with accelerator.autocast():
                images = generate(shown, target_text, steps=settings.preview_steps, cfg=settings.preview_cfg,
                                  seed=settings.seed, width=res, height=res, scheduler=settings.preview_scheduler,
                                  clip_skip=settings.clip_skip_or_none, imagic_alpha=alpha)
            path = os.path.join(run.previews_dir, f"{name}_alpha{alpha:g}.png")
            to_pil(images)[0].save(path)
            paths.append(path)
        tm.unet.train(was_training)
        if cb.preview:
            cb.preview(paths)

    # ---- 5. the loop: stage 1 (embedding), then stage 2 (UNet) ---------------------------------------------
    step, last_loss = start_step, None
    clock = StepClock()
    while step < total_steps:
        if stage.number == 1 and step >= embed_steps:      # stage 1 done: show it, then fine-tune the UNet
            preview("stage1", (0.0,))
            stage = unet_stage()
            say(f"Imagic stage 2: fine-tuning the UNet on the optimised embedding ({unet_steps} steps)")
        seed_global_rng(step_seed(settings.seed, step), device)
        gen = torch.Generator("cpu").manual_seed(step_seed(settings.seed, step, 1))
        batch = data.load_batch(plan, device=device, dtype=torch.float32, generator=gen)
        with accelerator.autocast():
            latents = batch.latents
            noise = sample_noise(latents, settings.offset_noise, gen)
            t = sample_timesteps(noise_scheduler, latents.shape[0], gen, device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            added = {"text_embeds": p_opt, "time_ids": batch.time_ids} if tm.is_sdxl else None
            pred = tm.unet(noisy, t, e_opt, added_cond_kwargs=added).sample
            loss = per_sample_mse(pred, training_target(noise_scheduler, latents, noise, t,
                                                        model.prediction_type)).mean()
        accelerator.backward(loss)
        loss_value = float(loss.detach())
        lr = stage.lr_scheduler.get_last_lr()[0]
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"the loss became {loss_value} at step {step + 1} (Imagic stage {stage.number}, learning rate "
                f"{lr:.3g}); training stopped without saving this state. Last good checkpoint: "
                f"{run.latest_checkpoint() or 'none'} (lower imagic_embed_lr / imagic_unet_lr, or mixed_precision "
                "bf16/no)")
        if settings.max_grad_norm > 0 and stage.number == 2:
            accelerator.clip_grad_norm_([p for p in unet_params if p.grad is not None], settings.max_grad_norm)
        stage.optimizer.step()
        stage.lr_scheduler.step()
        stage.optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = loss_value

        # ---- bookkeeping: log, progress, controls --------------------------------------------------------
        stage_step = step - (embed_steps if stage.number == 2 else 0)
        log_step(run, clock, cb.progress, step=step, total=total_steps, loss=loss_value, lr=lr,
                 logged={"epoch": stage.number, "stage": stage.number, "stage_step": stage_step},
                 shown={"epoch": stage.number, "epochs": 2, "stage": "embedding" if stage.number == 1 else "unet"},
                 main=main)
        stage_end = step in (embed_steps, total_steps)
        saved = requested_save(cb.control, lambda: save(step, loss_value), say)
        if stage_end and step < total_steps and settings.save_every_epochs and saved is None:
            saved = save(step, loss_value)
        if stop_requested(cb, stage_end) and step < total_steps:
            path = saved or save(step, loss_value)
            raise TrainingInterrupted(f"training stopped at step {step}/{total_steps} (Imagic stage {stage.number});"
                                      f" resumable checkpoint: {path}", run.path, step, path,
                                      TrainResult(result_model(stage.named), run.path, step, final_loss=loss_value,
                                                  report=report, info={"stopped": True}))

    # ---- 6. finish ---------------------------------------------------------------------------------------------
    if stage.number == 1:          # imagic_unet_steps is at least 1, so only an empty loop gets here
        stage = unet_stage()
    if main:
        preview("final", (0.0, 1.0))
        save(step, last_loss, final=True)
        run.update_config(finished=True, steps=step, final_loss=last_loss,
                          finished_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    return TrainResult(result_model(stage.named), run.path, step, final_loss=last_loss, report=report,
                       info=run.read_config())


def _constant(_step: int) -> float:
    return 1.0


__all__ = ["IMAGIC_KEYS", "TARGET_KEY", "OPTIMIZED_KEY", "TARGET_POOLED_KEY", "OPTIMIZED_POOLED_KEY",
           "SIDECAR_SUFFIX", "concept_problems", "interpolated", "is_imagic", "imagic_tensors", "load_sidecar",
           "save_sidecar", "sidecar_path", "train_imagic", "with_imagic"]
