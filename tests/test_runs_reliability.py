"""Run folders under concurrent, crashed and damaged conditions (issue 10, point 1): one process trains in a run at
a time, a damaged newest checkpoint falls back to an older one, and leftovers of a killed save are cleaned."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from trainer_fixtures import make_concept, read_losses, tiny_settings

pytestmark = pytest.mark.usefixtures("single_thread")


def _train(model, root, settings, concept, **kw):
    from comfyui_dreambooth.training.trainer import train

    return train(model, [concept], settings, output_root=str(root), **kw)


def _interrupted_run(model, root, concept, stop_at=3, **changes):
    """A run stopped after `stop_at` steps with a checkpoint after every step; returns the run folder."""
    from comfyui_dreambooth.training.trainer import TrainCallbacks, TrainingInterrupted

    done = {"step": 0}
    settings = tiny_settings(steps_per_image=2, save_every_epochs=0, keep_last_checkpoints=0, **changes)
    from comfyui_dreambooth.training.control import TrainingControl

    control = TrainingControl()

    def progress(p):
        done["step"] = p["step"]
        control.request_save()

    with pytest.raises(TrainingInterrupted) as e:
        _train(model, root, settings, concept, callbacks=TrainCallbacks(
            progress=progress, should_stop=lambda: done["step"] >= stop_at, control=control))
    return e.value.run_dir, settings


# ---- lock -------------------------------------------------------------------------------------------------------
HOLD = textwrap.dedent("""
    import sys, time
    from comfyui_dreambooth.training.runs import RunFolder
    with RunFolder(sys.argv[1]).lock():
        print("locked", flush=True)
        time.sleep(60)
""")


def _hold_lock(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow
def test_a_run_in_use_by_another_process_is_refused_with_its_pid(sd1, tmp_path):
    from comfyui_dreambooth.training.runs import RunInUseError

    concept = make_concept(tmp_path)
    run_dir, settings = _interrupted_run(sd1, tmp_path / "out", concept, stop_at=2)
    lines_before = read_losses(run_dir)
    proc = _hold_lock(run_dir)
    try:
        with pytest.raises(RunInUseError) as err:
            _train(sd1, tmp_path / "out", settings, concept)
        assert f"pid {proc.pid}" in str(err.value) and run_dir in str(err.value)
        assert read_losses(run_dir) == lines_before           # the other process's log is untouched
    finally:
        proc.kill()
        proc.wait()
    # the holder died (kill -9): its lock is gone, the run resumes and logs each step once
    result = _train(sd1, tmp_path / "out", settings, concept)
    assert result.run_dir == run_dir
    steps = [r["step"] for r in read_losses(run_dir)]
    assert steps == list(range(1, result.steps + 1))


def test_a_stale_lock_file_from_a_dead_process_is_taken_over(tmp_path):
    from comfyui_dreambooth.training.runs import RunFolder

    run = RunFolder.create(str(tmp_path), "r", {"run_id": "x"})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(os.path.join(run.path, ".lock"), "w", encoding="utf-8") as f:
        f.write(f"{dead.pid}\n")
    with run.lock():
        with open(os.path.join(run.path, ".lock"), encoding="utf-8") as f:
            assert f.read().split()[0] == str(os.getpid())


def test_lock_is_released_after_the_run(sd1, tmp_path):
    from comfyui_dreambooth.training.runs import RunFolder

    concept = make_concept(tmp_path)
    result = _train(sd1, tmp_path / "out", tiny_settings(steps_per_image=1), concept)
    with RunFolder(result.run_dir).lock():       # free again
        pass


# ---- damaged checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "zero", "state"])
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(sd1, tmp_path, damage):
    from comfyui_dreambooth.training.runs import RunFolder
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    concept = make_concept(tmp_path)
    run_dir, settings = _interrupted_run(sd1, tmp_path / "out", concept, stop_at=3)
    run = RunFolder(run_dir)
    newest = run.latest_checkpoint()
    assert newest.endswith("step-0000003")
    if damage == "truncate":
        path = os.path.join(newest, "trainable.safetensors")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "zero":
        open(os.path.join(newest, "optimizer.pt"), "wb").close()
    else:
        with open(os.path.join(newest, "state.json"), "w", encoding="utf-8") as f:
            f.write("{not json")
    logs = []
    result = _train(sd1, tmp_path / "out", settings, concept, callbacks=TrainCallbacks(log=logs.append))
    assert result.run_dir == run_dir
    said = "\n".join(logs)
    assert "step-0000003" in said and "step-0000002" in said, said
    assert [r["step"] for r in read_losses(run_dir)] == list(range(1, result.steps + 1))


@pytest.mark.slow
def test_resume_with_every_checkpoint_damaged_starts_again_and_says_so(sd1, tmp_path):
    from comfyui_dreambooth.training.runs import RunFolder
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    concept = make_concept(tmp_path)
    run_dir, settings = _interrupted_run(sd1, tmp_path / "out", concept, stop_at=2)
    for ckpt in RunFolder(run_dir).checkpoints():
        open(os.path.join(ckpt, "trainable.safetensors"), "wb").close()
    logs = []
    result = _train(sd1, tmp_path / "out", settings, concept, callbacks=TrainCallbacks(log=logs.append))
    assert any("no checkpoint" in line and "loads" in line for line in logs), logs
    assert [r["step"] for r in read_losses(result.run_dir)] == list(range(1, result.steps + 1))


# ---- leftovers of a killed save ---------------------------------------------------------------------------------
KILLED_SAVE = textwrap.dedent("""
    import os, sys, time
    from comfyui_dreambooth.training.runs import RunFolder
    run = RunFolder(sys.argv[1])
    def write(folder):
        open(os.path.join(folder, "trainable.safetensors"), "wb").write(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(60)
    run.save_checkpoint(9, write)
""")


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_nothing_after_the_next_start(sd1, tmp_path):
    from comfyui_dreambooth.training.runs import RunFolder

    concept = make_concept(tmp_path)
    run_dir, settings = _interrupted_run(sd1, tmp_path / "out", concept, stop_at=2)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, run_dir], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = os.path.join(run_dir, "checkpoints")
    assert any(n.startswith(".step-0000009") and n.endswith(".tmp") for n in os.listdir(ckpts))
    result = _train(sd1, tmp_path / "out", settings, concept)
    assert result.run_dir == run_dir
    hidden = [n for root in (run_dir, ckpts) for n in os.listdir(root) if n.endswith((".tmp", ".old"))]
    assert hidden == []
    assert RunFolder(run_dir).latest_checkpoint() is not None


# ---- review findings ----------------------------------------------------------------------------------------------
def test_two_creates_racing_for_one_name_never_delete_each_other(tmp_path, monkeypatch):
    """The name check and the mkdir were two steps: a process that lost the race deleted the winner's folder."""
    from comfyui_dreambooth.training import runs
    from comfyui_dreambooth.training.runs import RunFolder

    first = RunFolder.create(str(tmp_path), "r", {"run_id": "a"})
    marker = os.path.join(first.path, "loss.jsonl")
    open(marker, "w").close()
    with monkeypatch.context() as m:
        m.setattr(runs.os.path, "exists", lambda p: False)           # the second process saw the name free
        second = RunFolder.create(str(tmp_path), "r", {"run_id": "b"})
    assert second.path != first.path and os.path.exists(marker)
    assert first.read_config()["run_id"] == "a" and second.read_config()["run_id"] == "b"


@pytest.mark.slow
def test_a_damaged_checkpoint_passed_over_is_set_aside_and_never_outranks_good_ones(sd1, tmp_path):
    """It kept the highest step: keep_last_checkpoints then pruned the checkpoint just written in its favour."""
    from comfyui_dreambooth.training.runs import RunFolder

    concept = make_concept(tmp_path)
    run_dir, settings = _interrupted_run(sd1, tmp_path / "out", concept, stop_at=3)
    run = RunFolder(run_dir)
    newest = run.latest_checkpoint()
    open(os.path.join(newest, "trainable.safetensors"), "wb").close()
    result = _train(sd1, tmp_path / "out", settings.replace(keep_last_checkpoints=1), concept,
                    callbacks=_save_every_step())
    names = os.listdir(os.path.join(run_dir, "checkpoints"))
    assert ".step-0000003.damaged" in names
    assert RunFolder(run_dir).latest_checkpoint().endswith(f"step-{result.steps:07d}")


def _save_every_step():
    from comfyui_dreambooth.training.control import TrainingControl
    from comfyui_dreambooth.training.trainer import TrainCallbacks

    control = TrainingControl()
    return TrainCallbacks(progress=lambda p: control.request_save(), control=control)


def test_offloaded_frozen_parts_go_back_to_the_training_device(sd1, tmp_path, monkeypatch):
    """On a GPU the VAE and frozen text encoders move to the CPU once cached; they stayed there after training
    (the result, and the received model whose modules they are, could not sample)."""
    from comfyui_dreambooth.training.setup import precision

    moved_back = []

    def offload(tm, settings, device, **kw):
        modules = [tm.vae, *tm.text_encoders]
        for m in modules:
            real_to = m.to
            m.to = lambda *a, _m=m, _to=real_to, **k: (moved_back.append((_m, a, k)), _to(*a, **k))[1]
        return modules

    monkeypatch.setattr(precision, "offload_frozen", offload)
    concept = make_concept(tmp_path)
    result = _train(sd1, tmp_path / "out", tiny_settings(steps_per_image=1), concept)
    for m in (result.model.vae, *result.model.text_encoders):
        m.__dict__.pop("to", None)
    assert {id(m) for m, _, _ in moved_back} == {id(result.model.vae), *(id(te) for te in result.model.text_encoders)}
    assert all(str(a[0]) == "cpu" for _, a, _ in moved_back)        # the training device, here the CPU


def test_warmup_is_checked_against_the_run_shortened_by_a_text_encoder_only_run(sd1, tmp_path):
    from comfyui_dreambooth.training.settings import SettingsError

    with pytest.raises(SettingsError, match="lr_warmup_steps = 3"):
        _train(sd1, tmp_path / "out", tiny_settings(use_lora=False, train_unet=False, text_encoder_ratio=0.5,
                                                    steps_per_image=0, max_train_steps=4, lr_warmup_steps=3,
                                                    lr_scheduler="constant_with_warmup"), make_concept(tmp_path))


def test_settings_are_checked_against_the_precision_actually_used(sd1, tmp_path):
    """A bf16-loaded model with mixed_precision 'no' computes in bf16: frozen_dtype fp16 must be refused then."""
    import copy

    import torch

    from comfyui_dreambooth.training.settings import SettingsError

    half = sd1.replace(unet=copy.deepcopy(sd1.unet).to(torch.bfloat16),
                       text_encoders=[copy.deepcopy(te).to(torch.bfloat16) for te in sd1.text_encoders])
    with pytest.raises(SettingsError, match="frozen_dtype"):
        _train(half, tmp_path / "out", tiny_settings(mixed_precision="no", frozen_dtype="fp16", steps_per_image=1),
               make_concept(tmp_path))


def test_imagic_refuses_the_memory_settings_it_does_not_apply():
    settings = tiny_settings(train_imagic_only=True, weights_dtype="bf16", mixed_precision="bf16")
    problems = settings.validate(check_environment=False)
    assert any("train_imagic_only" in p and "weights_dtype" in p for p in problems), problems


def test_a_kill_between_the_two_renames_of_a_save_keeps_the_old_copy(tmp_path):
    """atomic_folder moves the old folder aside, then the new one in: killed in between, the '.old' copy is the only
    one and must be put back, not deleted as a leftover."""
    from comfyui_dreambooth.training.runs import RunFolder

    run = RunFolder.create(str(tmp_path), "r", {"run_id": "x"})
    aside = os.path.join(run.checkpoints_dir, ".step-0000002.0123abcd.old")
    os.makedirs(aside)
    open(os.path.join(aside, "state.json"), "w").write("{}")
    os.makedirs(os.path.join(run.checkpoints_dir, ".step-0000002.89abcdef.tmp"))
    with run.lock():
        run.remove_leftovers()
    assert os.listdir(run.checkpoints_dir) == ["step-0000002"]
    assert os.path.exists(os.path.join(run.checkpoints_dir, "step-0000002", "state.json"))


def test_an_error_applying_a_readable_checkpoint_is_not_taken_for_damage(sd1, tmp_path, monkeypatch):
    """Only a checkpoint that cannot be read is passed over; an error while applying one (out of memory, say) is
    raised as it is — falling back would start from a half-overwritten state."""
    from comfyui_dreambooth.training import checkpoints

    concept = make_concept(tmp_path)
    run_dir, settings = _interrupted_run(sd1, tmp_path / "out", concept, stop_at=3)

    def out_of_memory(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(checkpoints, "copy_weights", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        _train(sd1, tmp_path / "out", settings, concept)
    names = os.listdir(os.path.join(run_dir, "checkpoints"))
    assert "step-0000003" in names and not any(n.endswith(".damaged") for n in names)
