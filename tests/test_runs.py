"""Run folders: layout, discovery, checkpoints (atomic, keep-last), loss log; and config.json / loss.jsonl of a
real tiny run."""
import importlib.metadata
import json
import os
import re

import pytest

from comfyui_dreambooth.training.runs import RUNS_SUBFOLDER, RunFolder, compute_run_id, library_versions


def _write(folder, step):
    with open(os.path.join(folder, "weights.bin"), "w") as f:
        f.write(f"weights of step {step}")
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"step": step}, f)


# ---- layout ------------------------------------------------------------------------------------------------------
def test_create_makes_a_named_timestamped_folder(tmp_path):
    run = RunFolder.create(str(tmp_path), "my dog", {"run_id": "x", "created": "2024-01-01 00:00:00"})
    assert os.path.dirname(run.path) == str(tmp_path / RUNS_SUBFOLDER)
    assert re.fullmatch(r"my dog-\d{8}-\d{6}", os.path.basename(run.path))
    assert os.path.isdir(run.previews_dir) and os.path.isdir(run.checkpoints_dir)
    assert run.read_config() == {"run_id": "x", "created": "2024-01-01 00:00:00"}
    twin = RunFolder.create(str(tmp_path), "my dog", {"run_id": "y"})          # same second: a suffix, no clash
    assert twin.path != run.path and twin.read_config()["run_id"] == "y"


@pytest.mark.parametrize("name", ["../../escape", "a/b\\c", "", "..", "x" * 300])
def test_run_names_cannot_escape_the_runs_folder(tmp_path, name):
    run = RunFolder.create(str(tmp_path), name, {})
    runs = os.path.realpath(tmp_path / RUNS_SUBFOLDER)
    assert os.path.dirname(os.path.realpath(run.path)) == runs
    assert len(os.path.basename(run.path)) < 120


def test_update_config_keeps_other_keys(tmp_path):
    run = RunFolder.create(str(tmp_path), "r", {"a": 1, "finished": False})
    run.update_config(finished=True, steps=3)
    assert run.read_config() == {"a": 1, "finished": True, "steps": 3}
    assert [f for f in os.listdir(run.path) if f.endswith(".tmp")] == []


# ---- discovery ----------------------------------------------------------------------------------------------------
def test_find_finished_and_resumable_runs(tmp_path):
    root = str(tmp_path)
    unfinished_no_ckpt = RunFolder.create(root, "a", {"run_id": "id1", "finished": False, "created": "2024-01-01 00:00:01"})
    assert RunFolder.find(root, "id1", finished=False) is None            # nothing to resume from yet
    unfinished_no_ckpt.save_checkpoint(5, lambda d: _write(d, 5))
    assert RunFolder.find(root, "id1", finished=False).path == unfinished_no_ckpt.path
    assert RunFolder.find(root, "id1", finished=True) is None
    done = RunFolder.create(root, "b", {"run_id": "id1", "finished": True, "created": "2024-01-01 00:00:02"})
    assert RunFolder.find(root, "id1", finished=True) is None             # finished flag but no final/ folder
    done.save_final(lambda d: _write(d, 9))
    assert RunFolder.find(root, "id1", finished=True).path == done.path
    assert RunFolder.find(root, "other", finished=True) is None


def test_find_prefers_the_newest_run_not_the_alphabetically_last(tmp_path):
    root = str(tmp_path)
    newer = RunFolder.create(root, "aaa", {"run_id": "id", "finished": False, "created": "2024-05-01 10:00:00"})
    older = RunFolder.create(root, "zzz", {"run_id": "id", "finished": False, "created": "2024-01-01 10:00:00"})
    for run in (newer, older):
        run.save_checkpoint(1, lambda d: _write(d, 1))
    assert [r.path for r in RunFolder.all_runs(root)] == [older.path, newer.path]
    assert RunFolder.find(root, "id", finished=False).path == newer.path


def test_run_id_depends_on_everything_that_changes_the_result():
    base = dict(settings_hash="s", concepts=[{"dir": "x"}], item_hashes=["h1", "h2"], model_hash="m",
                adapter_or_full="lora")
    rid = compute_run_id(**base)
    assert compute_run_id(**{**base, "item_hashes": ["h2", "h1"]}) == rid         # order of images: same data
    for change in (dict(settings_hash="t"), dict(concepts=[{"dir": "y"}]), dict(item_hashes=["h1"]),
                   dict(model_hash="n"), dict(adapter_or_full="full")):
        assert compute_run_id(**{**base, **change}) != rid, change


# ---- checkpoints ------------------------------------------------------------------------------------------------------
def test_checkpoints_keep_last_and_numeric_order(tmp_path):
    run = RunFolder.create(str(tmp_path / "a"), "r", {})
    for step in (1, 2, 3):
        run.save_checkpoint(step, lambda d, s=step: _write(d, s), keep_last=0)
    os.makedirs(os.path.join(run.checkpoints_dir, "step-0000009"))            # incomplete: no state.json
    assert [os.path.basename(p) for p in run.checkpoints()] == ["step-0000001", "step-0000002", "step-0000003"]
    run.save_checkpoint(4, lambda d: _write(d, 4), keep_last=2)
    assert [os.path.basename(p) for p in run.checkpoints()] == ["step-0000003", "step-0000004"]
    assert run.latest_checkpoint().endswith("step-0000004")

    long_run = RunFolder.create(str(tmp_path / "b"), "r", {})
    for step in (10_000_000, 9_999_999):
        long_run.save_checkpoint(step, lambda d, s=step: _write(d, s))
    assert long_run.latest_checkpoint().endswith("step-10000000")


def test_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    run = RunFolder.create(str(tmp_path), "r", {})
    first = run.save_checkpoint(1, lambda d: _write(d, 1))

    def broken(folder):
        with open(os.path.join(folder, "weights.bin"), "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        run.save_checkpoint(2, broken, keep_last=1)
    assert run.checkpoints() == [first]
    assert os.listdir(run.checkpoints_dir) == ["step-0000001"]                 # no temporary folder left
    with open(os.path.join(first, "weights.bin")) as f:
        assert f.read() == "weights of step 1"
    # rewriting a step replaces it whole
    run.save_checkpoint(1, lambda d: _write(d, 11))
    with open(os.path.join(first, "state.json")) as f:
        assert json.load(f) == {"step": 11}


# ---- loss log ------------------------------------------------------------------------------------------------------
def test_loss_log_append_read_truncate(tmp_path):
    run = RunFolder.create(str(tmp_path), "r", {})
    assert run.read_loss() == []
    for step in range(1, 6):
        run.append_loss({"step": step, "loss": 1.0 / step})
    with open(run.loss_log, "a") as f:
        f.write('{"step": 6, "lo')                                           # cut by a crash
    assert [r["step"] for r in run.read_loss()] == [1, 2, 3, 4, 5]
    run.truncate_loss(3)
    assert [r["step"] for r in run.read_loss()] == [1, 2, 3]
    run.append_loss({"step": 4, "loss": 0.1})
    assert [r["step"] for r in run.read_loss()] == [1, 2, 3, 4]


def test_library_versions_are_the_installed_ones():
    versions = library_versions()
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"):
        assert versions[name] == importlib.metadata.version(name)


# ---- a real run's files ----------------------------------------------------------------------------------------------
def test_config_and_loss_log_of_a_real_run(tmp_path, single_thread, sd1):
    from comfyui_dreambooth.training.trainer import train
    from trainer_fixtures import make_concept, tiny_settings

    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(steps_per_image=2, run_name="my_run", learning_rate=None)
    result = train(sd1, [concept], settings, output_root=str(tmp_path / "out"))

    assert os.path.basename(result.run_dir).startswith("my_run-")
    with open(os.path.join(result.run_dir, "config.json")) as f:
        cfg = json.load(f)
    resolved = settings.resolved([concept])
    assert cfg["settings"] == json.loads(json.dumps(resolved.to_dict()))       # every setting, auto ones resolved
    assert cfg["settings"]["learning_rate"] == 1e-4
    assert cfg["concepts"] == [json.loads(json.dumps(concept.to_dict()))]
    assert cfg["base_model"] == {"path": "", "hash": sd1.source_hash, "family": "sd1",
                                 "prediction_type": "epsilon", "parent_run_id": None}
    assert cfg["libraries"] == library_versions()
    report = cfg["dataset_report"]
    assert report["examples_per_epoch"] == 2 and report["concepts"][0]["instance_images"] == 2
    assert cfg["finished"] is True and cfg["steps"] == cfg["total_steps"] == 4
    assert cfg["final_loss"] == result.final_loss and re.fullmatch(r"[0-9a-f]{16}", cfg["run_id"])
    assert {"created", "finished_at"} <= set(cfg)
    assert result.info == cfg
    with open(os.path.join(result.run_dir, "dataset_report.txt")) as f:
        assert f.read().strip() == result.report.strip()

    with open(os.path.join(result.run_dir, "loss.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [sorted(r) for r in records] == [["epoch", "loss", "lr", "step", "time"]] * 4
    assert [r["step"] for r in records] == [1, 2, 3, 4] and [r["epoch"] for r in records] == [1, 1, 2, 2]
    assert all(a["time"] <= b["time"] for a, b in zip(records, records[1:]))
    assert records[-1]["loss"] == result.final_loss
    assert sorted(os.listdir(os.path.join(result.run_dir, "final"))) == [
        "optimizer.pt", "state.json", "trainable.safetensors"]
