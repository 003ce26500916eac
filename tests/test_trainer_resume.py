"""Interrupt, resume, controls, divergence, failed saves and reuse of finished runs."""
import errno
import json
import os

import pytest
import torch

from trainer_fixtures import (load_tensors, make_concept, module_hash, read_losses, same_tensors,
                              tiny_settings)


pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one torch thread, a fresh tiny sd1 per module


def _train(model, root, settings, concept, **kw):
    from comfyui_dreambooth.training.trainer import train

    return train(model, [concept], settings, output_root=str(root), **kw)


def _stop_at(step, control=None, save_at=None):
    """Callbacks whose should_stop turns true once `step` optimizer steps are done (like ComfyUI's Cancel);
    with `save_at`, a checkpoint is also requested after that step."""
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    done = {"step": 0}

    def progress(p):
        done["step"] = p["step"]
        if save_at is not None and p["step"] == save_at:
            control.request_save()

    return TrainCallbacks(progress=progress, should_stop=lambda: done["step"] >= step, control=control)


def _curve(run_dir):
    return [{k: v for k, v in r.items() if k != "time"} for r in read_losses(run_dir)]


def _final_state(run_dir):
    state = load_tensors(os.path.join(run_dir, "final", "trainable.safetensors"))
    ema = os.path.join(run_dir, "final", "ema.pt")
    return state, (torch.load(ema, weights_only=True)["shadow"] if os.path.exists(ema) else None)


# ---- resume ------------------------------------------------------------------------------------------------------
RESUME_CASES = {
    # adapter dropout draws from the global RNG, flips and caption order from the data plan, TE freezes at step 2
    "lora": dict(use_lora=True, lora_dropout=0.1, text_encoder_ratio=0.5, use_ema=True, ema_decay=0.9,
                 lr_scheduler="cosine", data={"random_flip": True, "shuffle_tags": True}),
    "full": dict(use_lora=False, learning_rate=1e-4, text_encoder_ratio=0.5, use_ema=True, ema_decay=0.9,
                 lr_scheduler="linear", offset_noise=0.1, min_snr_gamma=5.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_continues_the_same_curve_bit_identically(sd1, tmp_path, case):
    """2 images x 2 epochs = 4 steps; interrupted after step 1 (mid-epoch, before the TE freezes at step 2)."""
    from comfyui_dreambooth.training.trainer import TrainingInterrupted

    concept = make_concept(tmp_path, n=2, instance_prompt="a photo of sks dog, red collar, on grass")
    settings = tiny_settings(steps_per_image=2, **RESUME_CASES[case])
    straight = _train(sd1, tmp_path / "straight", settings, concept)
    assert straight.steps == 4

    with pytest.raises(TrainingInterrupted) as stopped:
        _train(sd1, tmp_path / "resumed", settings, concept, callbacks=_stop_at(1))
    assert stopped.value.step == 1 and os.path.basename(stopped.value.checkpoint) == "step-0000001"
    assert [r["step"] for r in read_losses(stopped.value.run_dir)] == [1]

    resumed = _train(sd1, tmp_path / "resumed", settings, concept, resume="auto")
    assert resumed.run_dir == stopped.value.run_dir and resumed.steps == 4 and not resumed.reused
    assert _curve(resumed.run_dir) == _curve(straight.run_dir)
    (a, ema_a), (b, ema_b) = _final_state(straight.run_dir), _final_state(resumed.run_dir)
    assert same_tensors(a, b) and same_tensors(ema_a, ema_b)
    assert module_hash(resumed.model.unet) == module_hash(straight.model.unet)
    assert module_hash(resumed.model.text_encoders[0]) == module_hash(straight.model.text_encoders[0])
    assert module_hash(resumed.model.ema_unet) == module_hash(straight.model.ema_unet)


@pytest.mark.slow
def test_resume_from_an_explicit_earlier_checkpoint_and_new(sd1, tmp_path):
    """Checkpoints at steps 1 and 2, stopped after 2; resuming from step 1 re-logs steps 2.. (the log is cut)."""
    from comfyui_dreambooth.training.control import TrainingControl
    from comfyui_dreambooth.training.trainer import TrainingInterrupted

    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(steps_per_image=2)
    with pytest.raises(TrainingInterrupted) as stopped:
        _train(sd1, tmp_path / "out", settings, concept, callbacks=_stop_at(2, TrainingControl(), save_at=1))
    run_dir = stopped.value.run_dir
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step-0000001", "step-0000002"]
    fresh = _train(sd1, tmp_path / "out", settings, concept, resume="new")
    assert fresh.run_dir != run_dir and fresh.steps == 4
    first = os.path.join(run_dir, "checkpoints", "step-0000001")
    resumed = _train(sd1, tmp_path / "out", settings, concept, resume=first, reuse_finished=False)
    assert resumed.run_dir == run_dir
    assert _curve(resumed.run_dir) == _curve(fresh.run_dir)
    # a checkpoint of other settings is refused with a clear message
    with pytest.raises(ValueError, match="other settings"):
        _train(sd1, tmp_path / "out", settings.replace(learning_rate=5e-4), concept, resume=stopped.value.checkpoint)


# ---- TrainingControl ---------------------------------------------------------------------------------------------
def test_stop_after_epoch_stops_at_the_epoch_boundary(sd1, tmp_path):
    from comfyui_dreambooth.training.control import TrainingControl
    from comfyui_dreambooth.training.trainer import TrainCallbacks, TrainingInterrupted

    control = TrainingControl()
    callbacks = TrainCallbacks(control=control,
                               progress=lambda p: control.request_stop(after_epoch=True) if p["step"] == 1 else None)
    with pytest.raises(TrainingInterrupted) as stopped:
        _train(sd1, tmp_path, tiny_settings(steps_per_image=2), make_concept(tmp_path, n=3), callbacks=callbacks)
    assert stopped.value.step == 3                                   # end of epoch 1 (3 steps), not step 1
    assert os.path.basename(stopped.value.checkpoint) == "step-0000003"


def test_stop_now_and_save_now(sd1, tmp_path):
    from comfyui_dreambooth.training.control import TrainingControl
    from comfyui_dreambooth.training.trainer import TrainCallbacks, TrainingInterrupted

    control = TrainingControl()

    def progress(p):
        if p["step"] == 1:
            control.request_save()
        if p["step"] == 2:
            control.stop_now()

    with pytest.raises(TrainingInterrupted) as stopped:
        _train(sd1, tmp_path, tiny_settings(steps_per_image=2), make_concept(tmp_path, n=3),
               callbacks=TrainCallbacks(control=control, progress=progress))
    assert stopped.value.step == 2
    assert sorted(os.listdir(os.path.join(stopped.value.run_dir, "checkpoints"))) == ["step-0000001", "step-0000002"]


def test_save_request_keeps_training(sd1, tmp_path):
    from comfyui_dreambooth.training.control import TrainingControl
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    control = TrainingControl()
    result = _train(sd1, tmp_path, tiny_settings(steps_per_image=1), make_concept(tmp_path, n=3),
                    callbacks=TrainCallbacks(control=control,
                                             progress=lambda p: control.request_save() if p["step"] == 1 else None))
    assert result.steps == 3
    assert os.listdir(os.path.join(result.run_dir, "checkpoints")) == ["step-0000001"]
    with open(os.path.join(result.run_dir, "checkpoints", "step-0000001", "state.json")) as f:
        assert json.load(f)["step"] == 1


# ---- divergence and failed saves ------------------------------------------------------------------------------------
def test_nan_loss_stops_and_names_the_last_good_checkpoint(sd1, tmp_path, monkeypatch):
    from comfyui_dreambooth.training.setup import noise
    from comfyui_dreambooth.training.trainer import TrainingDiverged

    calls = {"n": 0}
    real = noise.per_sample_mse

    def mse(pred, target):
        calls["n"] += 1
        out = real(pred, target)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(noise, "per_sample_mse", mse)
    concept = make_concept(tmp_path, n=1)                                # one step per epoch
    with pytest.raises(TrainingDiverged, match="step-0000002") as e:
        _train(sd1, tmp_path / "out", tiny_settings(steps_per_image=5, save_every_epochs=1), concept)
    assert "nan" in str(e.value) and "step 3" in str(e.value)
    run_dir = [os.path.join(tmp_path / "out" / "dreambooth", d) for d in os.listdir(tmp_path / "out" / "dreambooth")
               if d != "cache"][0]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step-0000001", "step-0000002"]
    assert [r["step"] for r in read_losses(run_dir)] == [1, 2]            # the broken step is not logged
    assert not os.path.exists(os.path.join(run_dir, "final"))
    state = load_tensors(os.path.join(run_dir, "checkpoints", "step-0000002", "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())


def test_huge_learning_rate_diverges_cleanly(sd1, tmp_path):
    from comfyui_dreambooth.training.trainer import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="learning_rate"):
        _train(sd1, tmp_path, tiny_settings(use_lora=False, learning_rate=10.0, optimizer="SGD", max_grad_norm=0.0,
                                            steps_per_image=5), make_concept(tmp_path, n=2))


def test_failed_save_keeps_the_previous_checkpoint(sd1, tmp_path, monkeypatch):
    from comfyui_dreambooth.training import checkpoints
    from comfyui_dreambooth.training.trainer import TrainingSaveError

    real_save = checkpoints.save_fp32_safetensors       # writes trainable.safetensors a tensor at a time
    saves = {"n": 0}

    def save_file(tensors, filename):
        if os.path.basename(filename) == "trainable.safetensors":
            saves["n"] += 1
            if saves["n"] == 2:                 # disk full half-way through the second checkpoint
                with open(filename, "wb") as f:
                    f.write(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename)

    monkeypatch.setattr(checkpoints, "save_fp32_safetensors", save_file)
    concept = make_concept(tmp_path, n=1)
    settings = tiny_settings(steps_per_image=4, save_every_epochs=1)
    with pytest.raises(TrainingSaveError, match="step-0000001") as e:
        _train(sd1, tmp_path / "out", settings, concept)
    assert "No space left" in str(e.value)
    runs = tmp_path / "out" / "dreambooth"
    run_dir = [runs / d for d in os.listdir(runs) if d != "cache"][0]
    assert os.listdir(run_dir / "checkpoints") == ["step-0000001"]        # no half-written folder left
    first = load_tensors(str(run_dir / "checkpoints" / "step-0000001" / "trainable.safetensors"))
    assert first and all(torch.isfinite(t).all() for t in first.values())
    # the run resumes from the intact checkpoint once the disk has room again
    monkeypatch.setattr(checkpoints, "save_fp32_safetensors", real_save)
    resumed = _train(sd1, tmp_path / "out", settings, concept)
    assert resumed.run_dir == str(run_dir) and [r["step"] for r in read_losses(resumed.run_dir)] == [1, 2, 3, 4]


# ---- reuse of finished runs -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_identical_finished_run_is_reused_and_a_changed_setting_trains_anew(sd1, tmp_path):
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(steps_per_image=1, use_ema=True, ema_decay=0.9)
    first = _train(sd1, tmp_path / "out", settings, concept)
    steps = []
    again = _train(sd1, tmp_path / "out", settings.replace(preview_every_epochs=3, run_name="renamed"), concept,
                   callbacks=TrainCallbacks(progress=steps.append))
    assert again.reused and again.run_dir == first.run_dir and steps == []
    assert again.steps == first.steps and again.final_loss == first.final_loss
    assert module_hash(again.model.unet) == module_hash(first.model.unet)
    assert module_hash(again.model.ema_unet) == module_hash(first.model.ema_unet)
    changed = _train(sd1, tmp_path / "out", settings.replace(learning_rate=5e-4), concept)
    assert not changed.reused and changed.run_dir != first.run_dir
    assert module_hash(changed.model.unet) != module_hash(first.model.unet)
    # reuse can be declined
    fresh = _train(sd1, tmp_path / "out", settings, concept, reuse_finished=False, resume="new")
    assert not fresh.reused and fresh.run_dir not in (first.run_dir, changed.run_dir)


def test_training_a_trained_model_again_is_a_new_run(sd1, tmp_path):
    """A trained model keeps its base's source_hash; the same settings on it must train on, not reuse the
    run that produced it."""
    concept = make_concept(tmp_path, n=1)
    settings = tiny_settings(use_lora=False, steps_per_image=1)
    first = _train(sd1, tmp_path / "out", settings, concept)
    assert first.model.metadata["trained_run_id"] == first.info["run_id"]
    second = _train(first.model, tmp_path / "out", settings, concept)
    assert not second.reused and second.run_dir != first.run_dir
    assert second.info["base_model"]["parent_run_id"] == first.info["run_id"]
    assert module_hash(second.model.unet) != module_hash(first.model.unet)
    assert _train(sd1, tmp_path / "out", settings, concept).reused           # the base again: reused


@pytest.mark.slow
def test_requested_checkpoints_are_pruned_like_epoch_checkpoints(sd1, tmp_path, monkeypatch):
    """Issue 10.3: checkpoints written on request (the panel's Save now) count towards keep_last_checkpoints like
    the epoch checkpoints, so clicking Save now cannot fill the disk; and a step gets one checkpoint even when a
    request, the epoch save and a stop all fall on it (a full fine-tune checkpoint can be gigabytes)."""
    from comfyui_dreambooth.training.control import TrainingControl
    from comfyui_dreambooth.training.runs import RunFolder
    from comfyui_dreambooth.training.trainer import TrainCallbacks, TrainingInterrupted

    written = []
    real_save = RunFolder.save_checkpoint

    def counting_save(self, step, write, keep_last=0):
        written.append(step)
        return real_save(self, step, write, keep_last=keep_last)

    monkeypatch.setattr(RunFolder, "save_checkpoint", counting_save)
    control = TrainingControl()

    def progress(p):
        if p["step"] in (1, 2, 3, 4, 5):   # step 3 also closes epoch 1 (3 steps per epoch)
            control.request_save()

    result = _train(sd1, tmp_path / "a", tiny_settings(steps_per_image=2, save_every_epochs=1,
                                                       keep_last_checkpoints=2),
                    make_concept(tmp_path, n=3), callbacks=TrainCallbacks(control=control, progress=progress))
    assert result.steps == 6
    assert written == [1, 2, 3, 4, 5]
    assert sorted(os.listdir(os.path.join(result.run_dir, "checkpoints"))) == ["step-0000004", "step-0000005"]

    written.clear()

    def save_then_stop(p):
        if p["step"] == 2:
            control.request_save()
            control.stop_now()

    with pytest.raises(TrainingInterrupted) as stopped:
        _train(sd1, tmp_path / "b", tiny_settings(steps_per_image=2, keep_last_checkpoints=1),
               make_concept(tmp_path, n=3), callbacks=TrainCallbacks(control=control, progress=save_then_stop))
    assert written == [2] and os.path.basename(stopped.value.checkpoint) == "step-0000002"


# ---- issue 24.8 / 24.11: hand-edited run folders; a resume refusal before any work ------------------------------
def _interrupted(sd1, root, settings, concept):
    from comfyui_dreambooth.training.trainer import TrainingInterrupted

    with pytest.raises(TrainingInterrupted) as stopped:
        _train(sd1, root, settings, concept, callbacks=_stop_at(1))
    return stopped.value.run_dir


def test_resume_auto_says_why_a_run_whose_config_is_not_json_is_not_continued(sd1, tmp_path):
    """Issue 24.8: a config.json that is not JSON made resume auto start a new run without a word."""
    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(steps_per_image=2)
    run_dir = _interrupted(sd1, tmp_path / "out", settings, concept)
    with open(os.path.join(run_dir, "config.json"), "a", encoding="utf-8") as f:
        f.write("\n}} oops, an edit")
    lines = []
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    result = _train(sd1, tmp_path / "out", settings, concept, resume="auto", callbacks=TrainCallbacks(log=lines.append))
    assert result.run_dir != run_dir and result.steps == 4
    said = [line for line in lines if run_dir in line]
    assert said and "config.json" in said[0] and "not" in said[0] and "JSON" in said[0], lines
    assert "new run" in said[0], said[0]


def test_an_edited_config_json_is_detected_on_resume(sd1, tmp_path):
    """Issue 24.8: a hand-edited config.json (learning_rate, total_steps) was kept as it was and marked
    finished. The run continues with the settings it was started with, says which recorded values were edited,
    and its config.json records what was trained."""
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(steps_per_image=2)
    run_dir = _interrupted(sd1, tmp_path / "out", settings, concept)
    path = os.path.join(run_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["settings"]["learning_rate"] = 0.5
    cfg["total_steps"] = 99
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    lines = []
    result = _train(sd1, tmp_path / "out", settings, concept, resume="auto", callbacks=TrainCallbacks(log=lines.append))
    assert result.run_dir == run_dir and result.steps == 4
    said = [line for line in lines if line.startswith("resume: ") and "was edited" in line]
    assert said and "learning_rate" in said[0] and "total_steps" in said[0] and run_dir in said[0], lines
    with open(path, encoding="utf-8") as f:
        after = json.load(f)
    assert after["finished"] and after["settings"]["learning_rate"] == settings.learning_rate
    assert after["total_steps"] == 4


def test_a_resume_refusal_comes_before_the_latent_cache_is_written(sd1, tmp_path):
    """Issue 24.11: resuming from a run folder that has no checkpoint was refused only after the data was
    prepared (the latent cache written)."""
    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(steps_per_image=2, data={"cache_mode": "disk"})
    empty_run = tmp_path / "out" / "dreambooth" / "someone-20260101-000000"
    os.makedirs(empty_run / "checkpoints")
    (empty_run / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no checkpoint yet"):
        _train(sd1, tmp_path / "out", settings, concept, resume=str(empty_run))
    with pytest.raises(ValueError, match="neither"):
        _train(sd1, tmp_path / "out", settings, concept, resume=str(tmp_path / "nowhere"))
    assert not os.path.exists(tmp_path / "out" / "dreambooth" / "cache")


def _edit_config(run_dir, **changes):
    path = os.path.join(run_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("edit, why", [
    (lambda d: open(os.path.join(d, "config.json"), "w").write("[]"), "does not hold a JSON object"),
    (lambda d: os.remove(os.path.join(d, "config.json")), "config.json is missing"),
    (lambda d: _edit_config(d, run_id="f" * 16), "names another run"),
    (lambda d: _edit_config(d, finished=True), "marks it finished"),
])
def test_resume_auto_names_every_hand_edit_that_hides_a_run(sd1, tmp_path, edit, why):
    """Hostile pass: config.json a JSON array ended in AttributeError; deleted, with another run_id or marked
    finished, resume auto started a new run without a word."""
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(steps_per_image=2)
    run_dir = _interrupted(sd1, tmp_path / "out", settings, concept)
    edit(run_dir)
    lines = []
    result = _train(sd1, tmp_path / "out", settings, concept, resume="auto", callbacks=TrainCallbacks(log=lines.append))
    assert result.run_dir != run_dir and result.steps == 4
    said = [line for line in lines if line.startswith("resume: " + run_dir)]
    assert said and why in said[0] and "new run" in said[0], lines


def test_an_edited_run_id_is_named_and_restored_when_the_folder_is_resumed_by_name(sd1, tmp_path):
    """Hostile pass: resume naming a run folder whose config.json run_id was edited continued silently and kept
    the edited id."""
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(steps_per_image=2)
    run_dir = _interrupted(sd1, tmp_path / "out", settings, concept)
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        run_id = json.load(f)["run_id"]
    _edit_config(run_dir, run_id="f" * 16)
    lines = []
    result = _train(sd1, tmp_path / "out", settings, concept, resume=run_dir, callbacks=TrainCallbacks(log=lines.append))
    assert result.run_dir == run_dir and result.steps == 4
    assert any(line.startswith("resume: ") and "run_id" in line for line in lines), lines
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["run_id"] == run_id
