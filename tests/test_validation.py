"""Validation during training (issue 20): deterministic numbers, no effect on the trained weights, held-out images,
keep_best's rule, early_stop, TensorBoard event files read back with tensorboard's own reader."""
import json
import os

import pytest

from trainer_fixtures import load_tensors, make_concept, read_losses, same_tensors, tiny_settings

pytestmark = pytest.mark.usefixtures("single_thread")


def _train(model, root, settings, concept=None, logs=None):
    from comfyui_dreambooth.training.trainer import TrainCallbacks, train

    concept = concept or make_concept(root)
    cb = TrainCallbacks(log=logs.append if logs is not None else None)
    return train(model, [concept], settings, output_root=str(root / "out"), callbacks=cb)


def _records(run_dir):
    with open(os.path.join(run_dir, "validation.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _scripted(loss):
    """A validation record with this subject loss (every band the same) and no drift."""
    return {"loss": loss, "loss_low": loss, "loss_mid": loss, "loss_high": loss, "prior_drift": 0.0}


def _numbers(records):
    return [{k: v for k, v in r.items() if k not in ("checkpoint", "grid")} for r in records]


@pytest.mark.slow
def test_validation_is_deterministic_and_leaves_the_training_alone(sd1, tmp_path):
    """Two identical runs give identical validation numbers; the trained weights and the losses are bit-identical
    with validation off. lora_dropout draws from the global generator: a disturbed random state would show."""
    base = dict(lora_dropout=0.1, save_every_epochs=1, keep_last_checkpoints=0)
    concept = make_concept(tmp_path / "data")
    logs = []
    a = _train(sd1, tmp_path / "a", tiny_settings(**base, validate_every_steps=3), concept, logs)
    b = _train(sd1, tmp_path / "b", tiny_settings(**base, validate_every_steps=3), concept)
    off = _train(sd1, tmp_path / "off", tiny_settings(**base), concept)
    ra, rb = _records(a.run_dir), _records(b.run_dir)
    # step 0 (baseline), every 3 steps, the checkpoints (each epoch: 4 steps) and the end
    assert [r["step"] for r in ra] == [0, 3, 4, 6, 8]
    assert _numbers(ra) == _numbers(rb)
    assert all(r["held_out"] is False for r in ra)
    assert {"loss", "loss_low", "loss_mid", "loss_high", "prior_drift", "prior_drift_class",
            "prior_drift_neutral"} <= set(ra[1])
    assert ra[0]["prior_drift"] == 0.0 and ra[-1]["prior_drift"] > 0          # the base is the step-0 model
    assert any("on the training images" in line for line in logs)
    grids = [r["grid"] for r in ra if r.get("grid")]
    assert [r["step"] for r in ra if r.get("grid")] == [4, 8] and all(os.path.exists(g) for g in grids)
    assert not os.path.exists(os.path.join(off.run_dir, "validation.jsonl"))
    for run in (a, b):
        assert [r["loss"] for r in read_losses(run.run_dir)] == [r["loss"] for r in read_losses(off.run_dir)]
        assert same_tensors(load_tensors(os.path.join(run.run_dir, "final", "trainable.safetensors")),
                            load_tensors(os.path.join(off.run_dir, "final", "trainable.safetensors")))


@pytest.mark.slow
def test_held_out_images_leave_the_training_data(sd1, tmp_path):
    concept = make_concept(tmp_path / "data", n=4)
    logs = []
    result = _train(sd1, tmp_path, tiny_settings(validate_every_steps=2, validation_images="1",
                                                 validation_samples=0), concept, logs)
    assert result.steps == 6                                    # 3 training images x 2 epochs
    assert "held out from training: img_3.png" in result.report
    records = _records(result.run_dir)
    assert records and all(r["held_out"] for r in records) and not any(r.get("grid") for r in records)
    assert all(r["images"] == 1 for r in records)               # the number best.tie scales with
    assert any("1 held-out images" in line for line in logs)


def test_validation_settings_are_checked():
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    problems = DreamBoothSettings(keep_best=True, early_stop=3, validation_images="0").validate()
    assert any("keep_best and early_stop need validation numbers" in p and "validate_every_steps" in p
               for p in problems)
    assert any(p.startswith("validation_images = '0'") for p in problems)
    assert any(p.startswith("validation_images = '0' has no effect with validate_every_steps = 0") for p in problems)
    problems = DreamBoothSettings(validate_every_steps=10, keep_best=True, save_every_epochs=0).validate()
    assert problems == ["keep_best = True with save_every_epochs = 0: there are no checkpoints to choose from, only "
                        "the final state; set save_every_epochs (e.g. 5) or turn keep_best off"]
    assert DreamBoothSettings(validate_every_steps=100, keep_best=True, early_stop=3).validate() == []


def test_keep_best_rule():
    from comfyui_dreambooth.training.best import choose_best, stale_validations

    base = {"step": 0, "loss": 0.4, "prior_drift": 0.0}
    records = [base,
               {"step": 10, "loss": 0.30, "prior_drift": 0.02, "checkpoint": "c10"},
               {"step": 20, "loss": 0.20, "prior_drift": 0.08, "checkpoint": "c20"},
               {"step": 25, "loss": 0.10, "prior_drift": 0.01},                 # no checkpoint: not a candidate
               {"step": 30, "loss": 0.15, "prior_drift": 0.30, "checkpoint": "c30"},   # lowest loss, drifted
               {"step": 40, "loss": 0.209, "prior_drift": 0.05, "checkpoint": "c40"}]  # within 5 % of step 20
    best, why = choose_best(records, ceiling=0.25)              # ceiling 0.25 x 0.4 = 0.1
    assert best["checkpoint"] == "c40" and "lowest subject loss" in why and "the latest of 2 within 5.0%" in why
    no_tie = [dict(r, loss=0.211) if r.get("checkpoint") == "c40" else r for r in records]     # 5.5 % above
    assert choose_best(no_tie, ceiling=0.25)[0]["checkpoint"] == "c20"
    assert choose_best(records, ceiling=10)[0]["checkpoint"] == "c30"
    best, why = choose_best(records, ceiling=0.01)               # none under 0.004: the lowest drift
    assert best["checkpoint"] == "c10" and "lowest prior drift" in why
    assert choose_best([base], 0.25)[0] is None
    best, why = choose_best(records, ceiling=0)                  # the default: no ceiling, the lowest loss
    assert best["checkpoint"] == "c30" and "no drift ceiling" in why
    losses = [{"loss": v} for v in (0.5, 0.4, 0.45, 0.41, 0.39, 0.4, 0.42)]
    assert stale_validations(losses) == 2 and stale_validations(losses[:4]) == 2 and stale_validations([]) == 0


def test_keep_best_scores_by_the_low_and_middle_bands():
    """The high band's larger errors would rule a mean of all three (README "Toy world": they do not follow what the
    model draws); a record from an older run without band losses scores by its mean."""
    from comfyui_dreambooth.training.best import choose_best, score, stale_validations

    def rec(step, low, mid, high):
        return {"step": step, "loss": (low + mid + high) / 3, "loss_low": low, "loss_mid": mid, "loss_high": high,
                "prior_drift": 0.0, "checkpoint": f"c{step}"}

    records = [rec(350, 0.10, 0.14, 0.18), rec(400, 0.08, 0.12, 0.30)]     # mean of three: 0.14 vs 0.1667
    best, why = choose_best(records, ceiling=0)
    assert best["step"] == 400 and "low and middle bands (0.1)" in why
    assert score({"loss": 0.3}) == 0.3
    assert stale_validations([rec(1, 0.2, 0.2, 0.1), rec(2, 0.1, 0.1, 0.9)]) == 0     # step 2 improved


def test_keep_best_tie_is_the_measured_spread_scaled_by_the_images():
    """Two validations closer than one draw-to-draw spread of a score difference (5 % at 5 validation images,
    measured: best.py) are a tie, won by the later one; with 20 images the mean varies half as much (2.5 %)."""
    from comfyui_dreambooth.training.best import choose_best, tie

    def rec(step, loss, images):
        return {"step": step, "loss": loss, "prior_drift": 0.0, "checkpoint": f"c{step}", "images": images}

    assert tie({"loss": 1.0}) == 0.05 and tie(rec(1, 1.0, 5)) == 0.05 and abs(tie(rec(1, 1.0, 20)) - 0.025) < 1e-12
    assert choose_best([rec(550, 0.0632, 5), rec(600, 0.0660, 5)], 0)[0]["step"] == 600     # 4.4 % above
    assert choose_best([rec(550, 0.0632, 5), rec(600, 0.0752, 5)], 0)[0]["step"] == 550     # 19 % above
    assert choose_best([rec(550, 0.0632, 20), rec(600, 0.0660, 20)], 0)[0]["step"] == 550   # 4.4 % > 2.5 %


@pytest.mark.slow
def test_keep_best_keeps_the_best_beside_keep_last(sd1, tmp_path, monkeypatch):
    """The validation numbers are scripted (the rule is tested above): the best checkpoint survives
    keep_last_checkpoints = 1 and is named in config.json."""
    from comfyui_dreambooth.training import validation

    script = [0.5, 0.45, 0.3, 0.4, 0.35, 0.5, 0.6, 0.6, 0.4, 0.6, 0.6, 0.6, 0.37]   # steps 0..12
    seen = []

    def scripted(job):
        seen.append(None)
        return _scripted(script[len(seen) - 1])

    monkeypatch.setattr(validation, "measure", scripted)
    settings = tiny_settings(validate_every_steps=1, save_every_epochs=1, keep_last_checkpoints=1, keep_best=True,
                             validation_samples=0, steps_per_image=3)
    logs = []
    result = _train(sd1, tmp_path, settings, logs=logs)
    best = result.info["best"]
    # checkpoints at steps 4 (0.35) and 8 (0.4), the final state at 12 (0.37); step 2's 0.3 has no checkpoint
    assert best["step"] == 4 and best["checkpoint"].endswith("step-0000004")
    assert sorted(os.listdir(os.path.join(result.run_dir, "checkpoints"))) == ["step-0000004", "step-0000008"]
    assert any(line.startswith("best checkpoint of the run: step 4") for line in logs)


@pytest.mark.slow
def test_a_better_final_state_replaces_the_best_and_keep_last_prunes_the_old(sd1, tmp_path, monkeypatch):
    from comfyui_dreambooth.training import validation

    script = iter([0.5, 0.45, 0.3, 0.4, 0.35, 0.5, 0.6, 0.6, 0.4, 0.6, 0.6, 0.6, 0.2])
    monkeypatch.setattr(validation, "measure", lambda job: _scripted(next(script)))
    settings = tiny_settings(validate_every_steps=1, save_every_epochs=1, keep_last_checkpoints=1, keep_best=True,
                             validation_samples=0, steps_per_image=3)
    result = _train(sd1, tmp_path, settings)
    assert result.info["best"]["step"] == 12 and result.info["best"]["checkpoint"].endswith("final")
    assert sorted(os.listdir(os.path.join(result.run_dir, "checkpoints"))) == ["step-0000008"]


@pytest.mark.slow
def test_early_stop_ends_the_run_and_says_why(sd1, tmp_path, monkeypatch):
    from comfyui_dreambooth.training import validation

    losses = iter([0.5, 0.4, 0.41, 0.42, 0.43, 0.44, 0.45, 0.46, 0.47])
    monkeypatch.setattr(validation, "measure", lambda job: _scripted(next(losses)))
    logs = []
    settings = tiny_settings(validate_every_steps=1, early_stop=2, validation_samples=0)
    result = _train(sd1, tmp_path, settings, logs=logs)
    assert result.steps == 3 and result.info["finished"]
    assert any("early stop at step 3" in line and "not improved for 2 validations" in line for line in logs)
    assert os.path.isdir(os.path.join(result.run_dir, "final"))


def test_tensorboard_events_read_back(sd1, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = tiny_settings(tensorboard=True, validate_every_steps=4, save_every_epochs=1)
    result = _train(sd1, tmp_path, settings)
    events = EventAccumulator(result.run_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr/group_0", "validation/loss", "validation/loss_mid",
            "validation/prior_drift"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [r["loss"] for r in read_losses(result.run_dir)])
    assert [e.step for e in events.Scalars("validation/loss")] == [0, 4, 8]
    assert [r["images"] for r in _records(result.run_dir)] == [4, 4, 4]     # the training images (best.tie)
    assert "validation/grid" in tags["images"] and len(events.Images("validation/grid")) == 2


@pytest.mark.slow
@pytest.mark.parametrize("family, use_lora", [("sdxl", False), ("sd2", True)], ids=["sdxl-full", "sd2-lora"])
def test_other_families_and_a_validation_folder(tmp_path, family, use_lora):
    """SDXL (size conditioning, two text encoders) as a full fine-tune with its text encoder training, SD2
    v-prediction with LoRA; the subject loss on a folder of other photos."""
    from comfyui_dreambooth.training.models import build_tiny_model
    from trainer_fixtures import make_images

    model = build_tiny_model(family)
    folder = make_images(str(tmp_path / "other"), n=2, seed=7)
    logs = []
    settings = tiny_settings(use_lora=use_lora, validate_every_steps=4, validation_images=folder,
                             text_encoder_ratio=0.5, steps_per_image=1, save_every_epochs=1, max_train_steps=4)
    result = _train(model, tmp_path, settings, logs=logs)
    records = _records(result.run_dir)
    assert [r["step"] for r in records] == [0, 4] and records[0]["prior_drift"] == 0.0
    assert records[1]["prior_drift"] > 0 and records[1]["held_out"] and records[1]["grid"]
    assert any("the validation folder" in line for line in logs)


@pytest.mark.slow
def test_save_nodes_take_the_best_or_the_last(sd1, tmp_path, monkeypatch):
    """SaveLoRA / SaveCheckpoint `which`: best saves the best checkpoint's weights, last the final ones; a model
    without a best checkpoint is a clear error."""
    from comfyui_dreambooth.nodes import comfy_compat
    from comfyui_dreambooth.nodes.save import SaveCheckpoint, SaveLoRA
    import torch

    from comfyui_dreambooth.training import validation
    from comfyui_dreambooth.training.best import best_model
    from comfyui_dreambooth.training.export.lora import kohya_lora_state, load_kohya_lora

    script = iter([0.5, 0.4, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])           # best: the checkpoint of step 4
    monkeypatch.setattr(validation, "measure", lambda job: _scripted(next(script)))
    monkeypatch.setattr(comfy_compat, "models_folder", lambda kind: str(tmp_path / "models" / kind))
    settings = tiny_settings(validate_every_steps=2, save_every_epochs=1, keep_best=True, validation_samples=0,
                             learning_rate=1e-2)
    result = _train(sd1, tmp_path, settings)
    assert result.info["best"]["step"] == 4 and "best checkpoint: step 4" in result.report
    last = SaveLoRA().save(result.model, "last", "fp32")["result"][0]
    out = SaveLoRA().save(result.model, "best", "fp32", which="best")
    assert "step-0000004" in out["ui"]["text"][0]
    best_state, last_state = load_kohya_lora(out["result"][0])[0], load_kohya_lora(last)[0]
    assert not same_tensors(best_state, last_state)
    # the best file holds the checkpoint of step 4's weights; the trained model itself is unchanged
    chosen = best_model(result.model)
    checkpoint = load_tensors(os.path.join(result.info["best"]["checkpoint"], "trainable.safetensors"))
    assert checkpoint and all(torch.equal(chosen.unet.get_parameter(k[len("unet."):]).detach(), v)
                              for k, v in checkpoint.items())
    assert same_tensors(best_state, {k: v.float() for k, v in kohya_lora_state(chosen).items()})
    assert same_tensors(last_state, {k: v.float() for k, v in kohya_lora_state(result.model).items()})
    assert os.path.exists(SaveCheckpoint().save(result.model, "best", "safetensors", "fp16", which="best")
                          ["result"][0])
    with pytest.raises(ValueError, match="which = best: this model has no best checkpoint"):
        SaveLoRA().save(sd1, "nothing", "fp16", which="best")


def test_tensorboard_without_the_package_is_a_clear_settings_error(monkeypatch):
    from comfyui_dreambooth.training import compat
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    real = compat.installed
    monkeypatch.setattr(compat, "installed", lambda name: False if name == "tensorboard" else real(name))
    problems = DreamBoothSettings(tensorboard=True).validate()
    assert problems == ["tensorboard = True but the tensorboard package is not installed; `pip install tensorboard` "
                        "(or comfyui-dreambooth[tensorboard]) or set tensorboard = False"]
    assert DreamBoothSettings().validate() == []


@pytest.mark.slow
def test_resume_keeps_the_validations_up_to_its_checkpoint(sd1, tmp_path):
    """A run stopped after its step-4 checkpoint and resumed: validation.jsonl is made again from there, with the
    same numbers as an uninterrupted run, and the best checkpoint chosen before the stop is still known."""
    from comfyui_dreambooth.training.trainer import TrainCallbacks, TrainingInterrupted, train

    settings = tiny_settings(validate_every_steps=2, save_every_epochs=1, keep_best=True, validation_samples=0,
                             keep_last_checkpoints=0)
    concept = make_concept(tmp_path / "data")
    whole = _train(sd1, tmp_path / "whole", settings, concept)
    steps = []

    def stop():
        return len(steps) >= 5           # after step 5's progress: stops with its checkpoint at step 5

    cb = TrainCallbacks(progress=lambda p: steps.append(p["step"]), should_stop=stop)
    with pytest.raises(TrainingInterrupted):
        train(sd1, [concept], settings, output_root=str(tmp_path / "cut" / "out"), callbacks=cb)
    resumed = train(sd1, [concept], settings, output_root=str(tmp_path / "cut" / "out"))
    assert resumed.run_dir.startswith(str(tmp_path / "cut")) and resumed.steps == 8
    assert _numbers(_records(resumed.run_dir)) == _numbers(_records(whole.run_dir))
    assert resumed.info["best"]["step"] == whole.info["best"]["step"]


def test_validation_node_finds_and_checks_its_folder(tmp_path, monkeypatch):
    from comfyui_dreambooth.nodes import comfy_compat
    from comfyui_dreambooth.nodes.settings import DreamBoothValidationNode

    (tmp_path / "input" / "held").mkdir(parents=True)
    monkeypatch.setattr(comfy_compat, "input_directory", lambda: str(tmp_path / "input"))
    widgets = {"validate_every_steps": 50, "validation_prompt": "", "validation_samples": 1, "keep_best": True,
               "best_drift_ceiling": 0.25, "early_stop": 0, "tensorboard": False}
    (settings,) = DreamBoothValidationNode().build(validation_images="held", **widgets)
    assert settings.validation_images == str(tmp_path / "input" / "held") and settings.keep_best
    (settings,) = DreamBoothValidationNode().build(validation_images="2", **widgets)
    assert settings.validation_images == "2"


def test_a_resumed_panel_gets_the_validations_up_to_the_checkpoint(tmp_path):
    from comfyui_dreambooth.nodes.train import resumed_validation
    from comfyui_dreambooth.training.validation import append_record

    for step, loss in ((0, 0.5), (4, 0.4), (8, 0.3)):
        append_record(str(tmp_path), {"step": step, "loss": loss, "prior_drift": 0.0})
    assert resumed_validation(str(tmp_path), 4) == [[0, 0.5], [4, 0.4]]
    assert resumed_validation(str(tmp_path / "missing"), 4) == []


def test_tensorboard_of_a_resumed_run_has_each_step_once(sd1, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from comfyui_dreambooth.training.trainer import TrainCallbacks, TrainingInterrupted, train

    settings = tiny_settings(tensorboard=True, validate_every_steps=2, validation_samples=0, save_every_epochs=1)
    concept = make_concept(tmp_path / "data")
    steps = []
    cb = TrainCallbacks(progress=lambda p: steps.append(p["step"]), should_stop=lambda: len(steps) >= 5)
    with pytest.raises(TrainingInterrupted):
        train(sd1, [concept], settings, output_root=str(tmp_path / "out"), callbacks=cb)
    result = train(sd1, [concept], settings, output_root=str(tmp_path / "out"))
    events = EventAccumulator(result.run_dir, size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [r["loss"] for r in read_losses(result.run_dir)])
    assert [e.step for e in events.Scalars("validation/loss")] == [0, 2, 4, 6, 8]


@pytest.mark.slow
def test_two_processes_validate_on_rank_0_and_stop_early_together(tmp_path):
    """Data-parallel: rank 0 validates, every rank agrees on early_stop (no rank waits for a step the other never
    takes). Rank 0's validations are scripted: no improvement after step 1, early_stop 2 ends the run at step 3."""
    import subprocess
    import sys

    from trainer_fixtures import make_images

    here = os.path.dirname(os.path.abspath(__file__))
    make_images(str(tmp_path / "instance"), 2)
    spec = {"instance_dir": str(tmp_path / "instance"), "output_root": str(tmp_path / "runs"),
            "phases": [{"out_dir": str(tmp_path / "out"), "validation_losses": [0.5, 0.4, 0.45, 0.46, 0.3],
                        "settings": {"steps_per_image": 10, "validate_every_steps": 1, "early_stop": 2,
                                     "validation_samples": 0}}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    parent = os.path.dirname(os.path.dirname(os.path.abspath(__import__("comfyui_dreambooth").__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COMFYUI_DREAMBOOTH_COLLECTIVE_TIMEOUT_MIN": "2",
           "PYTHONPATH": os.pathsep.join(p for p in (parent, os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                           "--nproc_per_node", "2", os.path.join(here, "multiprocess_worker.py"),
                           str(tmp_path / "spec.json")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [3, 3]
    assert any("early stop at step 3" in line for line in ranks[0]["log"])
    assert [r["step"] for r in _records(ranks[0]["run"])] == [0, 1, 2, 3]
