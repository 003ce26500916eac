"""One long-lived process (ComfyUI runs every queued prompt in one) runs any sequence of trainings and samplings:
other mixed precision, LoRA then full, other models, an interrupted run then a new one. Each result equals the
same job in a fresh process, and the process holds no more tensors after a job than after the first."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SEQUENCE = ["sd1_lora", "sd1_full_bf16", "sd2_lora_te_interrupted", "sd2_lora_te", "sd1_lora"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from comfyui_dreambooth.training.models import build_tiny_model, save_single_file

    root = tmp_path_factory.mktemp("long_lived_models")
    for family in ("sd1", "sd2"):
        save_single_file(build_tiny_model(family), str(root / f"tiny_{family}.safetensors"), dtype="fp32")
    return str(root)


def _run_all(models_dir, tmp_path, job_lists):
    """Each list of jobs in its own process, two at a time (the machine has 2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    outs, pending, results = [tmp_path / f"run{i}.json" for i in range(len(job_lists))], [], []
    for out, jobs in zip(outs, job_lists):
        pending.append(subprocess.Popen([sys.executable, os.path.join(HERE, "long_lived_jobs.py"), models_dir,
                                         str(out), *jobs], stderr=subprocess.PIPE, text=True, env=env))
        if len(pending) == 2 or out == outs[-1]:
            for proc in pending:
                _, err = proc.communicate(timeout=600)
                assert proc.returncode == 0, err[-4000:]
            pending = []
    for out in outs:
        with open(out, encoding="utf-8") as f:
            results.append(json.load(f))
    return results


@pytest.mark.slow
def test_trainings_in_one_process_equal_fresh_processes(models_dir, tmp_path):
    together, *alone = _run_all(models_dir, tmp_path, [SEQUENCE] + [[name] for name in SEQUENCE[1:-1]])
    results = together["results"]
    assert [name for name, _ in results] == SEQUENCE
    assert results[2][1]["interrupted_at"] == 2
    # the first job ran in a fresh process; it runs again last, after every other kind of job
    assert results[-1][1] == results[0][1]
    for (name, result), fresh in zip(results[1:-1], alone):
        assert result == fresh["results"][0][1], f"{name}: in one process {result}, in a fresh process {fresh}"

    # nothing of a finished job stays alive: tensor count back to the level after the first job
    memory = together["memory"]
    first = memory[0]["live_tensors"]
    for m in memory[1:]:
        assert m["live_tensors"] <= first + 16, memory
    # RSS: no model-sized growth between the first and the repeated last job (allocator slack allowed)
    assert memory[-1]["rss_mb"] - memory[0]["rss_mb"] < 150, memory
    print(json.dumps(memory))
