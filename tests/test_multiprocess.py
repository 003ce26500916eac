"""Data-parallel training in several processes, on the CPU with gloo (torch's launcher, as `accelerate launch`
and `comfyui-dreambooth run --num-processes N` start it). Each launch costs ~15 s on 2 cores: the cases share
launches where they can."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trainer_fixtures import make_images, tiny_settings

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__import__("comfyui_dreambooth").__file__)))
# the same data order needs both images in every optimizer step: 2 images, effective batch 2
SETTINGS = dict(text_encoder_ratio=1.0, steps_per_image=3)
# float32 sums in another order, through 3 AdamW steps (measured: <= 1.1e-4; Adam's normalisation magnifies
# the rounding of gradients near zero); a rank that missed the other's gradients is off by ~1
RELATIVE_TOLERANCE = 1e-3


def _env():
    path = os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path,
            "COMFYUI_DREAMBOOTH_COLLECTIVE_TIMEOUT_MIN": "2"}


def _launch(tmp_path, phases, timeout=300):
    """Two ranks of tests/multiprocess_worker.py running `phases` in turn; returns (launcher exit code, output,
    {phase name: [rank records, None where a rank wrote none]})."""
    spec = {"instance_dir": str(tmp_path / "instance"), "output_root": str(tmp_path / "runs"),
            "phases": [{"out_dir": str(tmp_path / name), **phase} for name, phase in phases.items()]}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                           "--nproc_per_node", "2", os.path.join(HERE, "multiprocess_worker.py"), str(spec_path)],
                          capture_output=True, text=True, timeout=timeout, env=_env())
    records = {}
    for name in phases:
        paths = [tmp_path / name / f"rank-{rank}.json" for rank in (0, 1)]
        records[name] = [json.loads(p.read_text()) if p.exists() else None for p in paths]
    return proc.returncode, proc.stdout + proc.stderr, records


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _concept(tmp):
    from comfyui_dreambooth.training.data.settings import ConceptSettings

    return ConceptSettings(instance_dir=str(tmp / "instance"), instance_prompt="a photo of sks dog",
                           class_prompt="a photo of dog", num_class_images_per_image=0)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, sd1):
    """One launch of 2 processes running, in turn: a run stopped at step 2 (rank 0's stop request), the same
    run resumed to its end, a run left interrupted at step 1 (for a later one-process run), an attempt to resume a
    one-process run, then a base_model-prior run in which rank 1 fails at step 3."""
    from comfyui_dreambooth.training.trainer import TrainCallbacks, TrainingInterrupted, train

    tmp = tmp_path_factory.mktemp("mp")
    make_images(str(tmp / "instance"), 2)
    with pytest.raises(TrainingInterrupted) as one_process:        # a one-process run interrupted at step 1
        done = []
        train(sd1, [_concept(tmp)], tiny_settings(**SETTINGS), output_root=str(tmp / "one_runs"),
              callbacks=TrainCallbacks(progress=lambda p: done.append(p), should_stop=lambda: bool(done)))
    code, output, records = _launch(tmp, {
        "first": dict(settings=SETTINGS, stop_at=2),
        "second": dict(settings=SETTINGS),
        "left": dict(settings=SETTINGS, stop_at=1, output_root=str(tmp / "left_runs")),
        "mismatch": dict(settings=SETTINGS, resume=one_process.value.run_dir, expect_error=True,
                         output_root=str(tmp / "one_runs")),
        "half": dict(settings=dict(mixed_precision="no", steps_per_image=1), half=True, sample=True,
                     output_root=str(tmp / "half_runs")),
        "fail": dict(settings=dict(steps_per_image=20, prior_mode="base_model"), fail_rank=1, fail_at=3,
                     output_root=str(tmp / "fail_runs"))})
    return tmp, code, output, records


@pytest.fixture(scope="module")
def interrupted_then_resumed(launched):
    tmp, _, output, records = launched
    assert None not in records["first"] + records["second"], output[-4000:]
    return tmp, records["first"], records["second"]


@pytest.mark.slow
def test_two_processes_stop_together_and_resume(interrupted_then_resumed):
    tmp, first, second = interrupted_then_resumed
    assert [r["interrupted"] for r in first] == [True, True]          # rank 1 stopped with rank 0, no hang
    assert first[0]["steps"] == first[1]["steps"] == 2
    assert first[0]["run"] == first[1]["run"] == second[0]["run"] == second[1]["run"]   # resumed, one run folder
    assert second[0]["steps"] == 3 and second[0]["progress_steps"] == [3]
    assert second[1]["progress_steps"] == []                           # only rank 0 reports progress
    runs = [d for d in os.listdir(tmp / "runs" / "dreambooth") if (tmp / "runs" / "dreambooth" / d / "config.json").exists()]
    assert len(runs) == 1
    run = tmp / "runs" / "dreambooth" / runs[0]
    losses = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3]                    # each step once, written by rank 0 only
    config = json.loads((run / "config.json").read_text())
    assert config["processes"] == 2 and config["finished"] and config["total_steps"] == 3
    assert "effective batch 2 x 1 x 1 = 2" in (run / "dataset_report.txt").read_text()


@pytest.mark.slow
def test_both_ranks_hold_identical_weights_equal_to_one_process_at_the_same_effective_batch(
        interrupted_then_resumed, sd1, tmp_path):
    import torch

    from comfyui_dreambooth.training.data.settings import ConceptSettings
    from comfyui_dreambooth.training.trainer import train

    tmp, _, second = interrupted_then_resumed
    rank0, rank1 = _tensors(tmp / "second" / "rank-0.safetensors"), _tensors(tmp / "second" / "rank-1.safetensors")
    assert any(k.startswith("te0.") for k in rank0)                    # the text encoder LoRA trained too
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k                      # gradients averaged: the same update

    concept = ConceptSettings(instance_dir=str(tmp / "instance"), instance_prompt="a photo of sks dog",
                              class_prompt="a photo of dog", num_class_images_per_image=0)
    one = train(sd1, [concept], tiny_settings(**SETTINGS, batch_size=2), output_root=str(tmp_path / "one"))
    assert one.steps == 3                                              # 2 processes x batch 1 = 1 process x batch 2
    single = {f"unet.{k}": v for k, v in one.model.unet.state_dict().items() if "lora" in k}
    single.update({f"te0.{k}": v for k, v in one.model.text_encoders[0].state_dict().items() if "lora" in k})
    assert set(single) == set(rank0)
    for k, v in single.items():
        v = v.float()
        assert float((rank0[k] - v).norm() / v.norm()) < RELATIVE_TOLERANCE, k
    # one process at batch 1 takes twice the steps of two processes at batch 1 over the same epochs
    per_process = train(sd1, [concept], tiny_settings(**SETTINGS),
                        output_root=str(tmp_path / "b1"))
    assert per_process.steps == 2 * 3


@pytest.mark.slow
def test_resuming_with_another_number_of_processes_is_refused(interrupted_then_resumed, sd1, tmp_path):
    from comfyui_dreambooth.training.data.settings import ConceptSettings
    from comfyui_dreambooth.training.trainer import train

    tmp, first, _ = interrupted_then_resumed
    concept = ConceptSettings(instance_dir=str(tmp / "instance"), instance_prompt="a photo of sks dog",
                              class_prompt="a photo of dog", num_class_images_per_image=0)
    with pytest.raises(ValueError, match=r"trained by 2 process\(es\).*same number \(this run has 1\)"):
        train(sd1, [concept], tiny_settings(**SETTINGS), output_root=str(tmp_path), resume=first[0]["run"])


@pytest.mark.slow
def test_resuming_a_one_process_run_with_two_ends_both_with_the_reason(launched):
    """Rank 0 decides which run continues (it holds the lock); the other learns its decision, or its error."""
    _, _, output, records = launched
    rank0, rank1 = records["mismatch"]
    assert rank0 is not None and rank1 is not None, output[-4000:]
    assert "trained by 1 process(es)" in rank0["error"] and "this run has 2" in rank0["error"]
    assert "process 0" in rank1["error"] and "trained by 1 process(es)" in rank1["error"]


def test_the_result_of_a_bf16_loaded_model_samples_after_training_in_two_processes(launched):
    """The trained modules keep accelerate's autocast forward with several processes too (rank 0 samples the
    result: fp32 trained LoRA weights beside bf16 frozen ones)."""
    _, _, output, records = launched
    rank0, rank1 = records["half"]
    assert rank0 is not None and rank1 is not None, output[-4000:]
    assert rank0["sampled"] == [[1, 64, 64, 3], True]


@pytest.mark.slow
def test_one_process_says_why_it_does_not_continue_a_two_process_run(launched, sd1):
    """resume auto: the same settings and data interrupted under 2 processes are not continued by 1 (another
    effective batch); the run says so instead of silently starting over, and keeps the old run."""
    from comfyui_dreambooth.training.trainer import TrainCallbacks, train

    tmp, _, output, records = launched
    left = records["left"][0]
    assert left is not None and left["interrupted"], output[-4000:]
    assert not any("trained by" in line for r in records["left"] for line in r["log"])
    said = []
    result = train(sd1, [_concept(tmp)], tiny_settings(**SETTINGS), output_root=str(tmp / "left_runs"),
                   callbacks=TrainCallbacks(log=said.append))
    assert result.run_dir != left["run"] and os.path.isdir(left["run"])
    (line,) = [m for m in said if "trained by 2 process(es)" in m]
    assert left["run"] in line and "--num-processes 2" in line


def test_base_model_prior_trains_then_a_failing_rank_ends_the_others_with_its_message(launched):
    """prior_mode base_model runs the UNet twice before one backward (a DDP wrapper rejects that): steps 1 and 2
    complete on both ranks; rank 1 then fails in step 3 while rank 0 waits for its gradients."""
    _, code, output, records = launched
    assert code != 0
    assert "injected failure on rank 1 at step 3" in output
    assert records["fail"] == [None, None]             # no rank finished as if nothing happened
    assert "Timeout" not in output                     # ended by the launcher, not by waiting out the timeout


def test_run_num_processes_relaunches_itself_under_torchs_launcher(monkeypatch, tmp_path):
    import subprocess as sp

    from comfyui_dreambooth import cli

    calls = []

    class Launched:
        pid = -1

        def __init__(self, argv, env, start_new_session):
            calls.append(argv)
            assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) >= 600    # time for a graceful stop's checkpoint
            assert os.path.isdir(env["COMFYUI_DREAMBOOTH_SUPERVISOR"])  # where the processes register for Ctrl-C
            assert start_new_session == (os.name == "posix")           # Ctrl-C reaches the launcher only via us

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0
    from comfyui_dreambooth.runner.launch import LAUNCHER

    monkeypatch.setattr(sp, "Popen", Launched)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    monkeypatch.chdir(tmp_path)        # the command reads the workflow before it starts processes (issue 24.5)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)        # one process per core (GPU) at most
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    (tmp_path / "wf.json").write_text(json.dumps({"1": {"class_type": "DreamBoothSettings", "_meta": {"title": "A"},
                                                        "inputs": {"batch_size": 1}}}))
    assert cli.main(["run", "wf.json", "--num-processes", "3", "--set", "A.batch_size=1", "--output-dir", "o"]) == 0
    (argv,) = calls
    assert argv[:8] == [sys.executable, "-c", LAUNCHER, "--standalone", "--nnodes", "1", "--nproc_per_node", "3"]
    assert "torch.distributed.run import parse_args, run" in LAUNCHER         # torch's launcher, ending quietly
    assert argv[8:] == ["-m", "comfyui_dreambooth", "run", "wf.json", "--set", "A.batch_size=1", "--output-dir", "o"]


@pytest.mark.slow
def test_accelerate_launch_runs_the_workflow_once_and_saves_once(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m comfyui_dreambooth run` (gloo on this CPU) on the demo
    workflow: prior preservation with class images that rank 0 generates while rank 1 waits; rank 1 runs only
    the training and what it needs."""
    from comfyui_dreambooth import demo

    out = tmp_path / "out"
    demo.make_tiny_checkpoint(str(out / "checkpoints" / demo.CHECKPOINT_NAME))
    concept = out / "input" / "concept"
    demo.make_concept_images(str(concept), count=2)
    overrides = demo.demo_overrides(demo.CHECKPOINT_NAME, str(concept), epochs=2)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "comfyui_dreambooth", "run", demo.example_workflow_path(), "--output-dir", str(out), "--quiet", "--json"]
    for o in overrides + [f"{demo.SAMPLE}.steps=2"]:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stderr.count("training 4 steps (2/epoch)") == 1         # rank 1 trains silently; --json: on stderr
    report = json.loads(proc.stdout)         # stdout is one report, from rank 0, alone (two would not parse)
    assert report["status"] == "success"
    loras = list((out / "loras").rglob("*.safetensors"))
    assert [p.name for p in loras] == [f"{demo.LORA_NAME}.safetensors"]
    reported = {item["filename"] for ui in report["outputs"].values() for items in ui.values()
                for item in (items if isinstance(items, list) else []) if isinstance(item, dict) and "filename" in item}
    samples = {p.name for p in (out / os.path.dirname(demo.SAMPLE_PREFIX)).glob("*.png")}
    assert samples and samples <= reported                   # only rank 0 sampled and saved
    runs = [d for d in (out / "dreambooth").iterdir() if (d / "config.json").exists()]
    assert len(runs) == 1
    config = json.loads((runs[0] / "config.json").read_text())
    assert config["processes"] == 2 and config["finished"]
    class_dir = config["concepts"][0]["class_dir"]
    assert len([f for f in os.listdir(class_dir) if f.endswith(".png")]) == 2        # 1 per image, made once
    losses = [json.loads(line)["step"] for line in (runs[0] / "loss.jsonl").read_text().splitlines()]
    # 2 images + 2 class images = 4 batches of 1 per epoch, 2 per process; 2 epochs
    assert losses == [1, 2, 3, 4]


def test_each_process_uses_its_own_gpu_from_the_start(monkeypatch):
    import torch

    from comfyui_dreambooth.training.distributed import pin_local_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")                  # second GPU of the second machine
    pin_local_device()
    monkeypatch.setenv("WORLD_SIZE", "1")
    pin_local_device()                                     # one process: the device is left as it is
    assert chosen == [1]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")                  # more processes than GPUs: said so, by name
    with pytest.raises(RuntimeError, match=r"process 3 wants GPU 2 \(LOCAL_RANK\) but this machine shows 2 GPU"):
        pin_local_device()


def test_cli_run_pins_the_device_before_anything_loads(monkeypatch):
    from comfyui_dreambooth import cli
    from comfyui_dreambooth.training import distributed

    order = []
    monkeypatch.setattr(distributed, "pin_local_device", lambda: order.append("pin"))
    monkeypatch.setattr("comfyui_dreambooth.runner.run_workflow", lambda *a, **k: order.append("run") or {
        "status": "success", "format": "api", "output_dir": "o", "executed": [], "outputs": {}, "timings": {}})
    assert cli.main(["run", "wf.json", "--quiet"]) == 0
    assert order == ["pin", "run"]


def _launch_demo_in_two_processes(tmp_path, epochs):
    from comfyui_dreambooth import demo

    out = tmp_path / "out"
    demo.make_tiny_checkpoint(str(out / "checkpoints" / demo.CHECKPOINT_NAME))
    concept = out / "input" / "concept"
    demo.make_concept_images(str(concept), count=2)
    cmd = [sys.executable, "-m", "comfyui_dreambooth", "run", demo.example_workflow_path(), "--output-dir", str(out),
           "--num-processes", "2"]
    for o in demo.demo_overrides(demo.CHECKPOINT_NAME, str(concept), epochs=epochs):
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                            start_new_session=True)      # the test's own Ctrl-C must not reach it
    return out, proc


def _finish(proc, out):
    """The rest of the command's output; kills what is left of the run if the command does not end."""
    import signal

    try:
        rest, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:        # the launcher and the processes run in sessions of their own
            proc.send_signal(signal.SIGKILL)
            subprocess.run(["pkill", "-9", "-f", str(out)], check=False)
    return rest


def _running(out) -> int:
    """How many processes have `out` on their command line (read whole from /proc: ps cuts long lines)."""
    import glob

    count = 0
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                count += str(out).encode() in f.read()
        except OSError:
            continue
    return count


def _left_running(out) -> bool:
    return _running(out) > 0


def _registry_of(proc) -> str:
    """The folder where the processes of the command `proc` register (from the launcher's environment)."""
    import glob

    for environ in glob.glob("/proc/[0-9]*/environ"):
        try:
            with open(environ, "rb") as f:
                entries = f.read().split(b"\0")
            with open(os.path.join(os.path.dirname(environ), "stat")) as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == proc.pid:
            for entry in entries:
                if entry.startswith(b"COMFYUI_DREAMBOOTH_SUPERVISOR="):
                    return entry.split(b"=", 1)[1].decode()
    raise AssertionError("the launcher's environment has no registry")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="sends SIGINT as a terminal's Ctrl-C does; reads /proc")
def test_ctrl_c_under_num_processes_stops_every_process_with_a_checkpoint(tmp_path):
    """`run --num-processes 2`, Ctrl-C once during training: every process stops at its next check, rank 0
    saves a checkpoint, the command exits as interrupted, and no process is left running."""
    import signal
    import time

    out, proc = _launch_demo_in_two_processes(tmp_path, epochs=400)
    seen, deadline = [], time.time() + 240
    try:
        for line in proc.stdout:
            seen.append(line)
            if ("training " in line and " steps (" in line) or time.time() > deadline:
                break
        time.sleep(3)                                     # a few steps in
    finally:
        proc.send_signal(signal.SIGINT)                   # to the command only, as the terminal's is now
        rest = _finish(proc, out)
    output = "".join(seen) + rest
    assert proc.returncode == 130, output[-4000:]
    runs = [d for d in (out / "dreambooth").iterdir() if (d / "config.json").exists()]
    assert len(runs) == 1, output[-4000:]
    config = json.loads((runs[0] / "config.json").read_text())
    assert not config["finished"]
    checkpoints = [d for d in (runs[0] / "checkpoints").iterdir() if (d / "state.json").exists()]
    assert checkpoints, output[-4000:]
    assert "Traceback" not in output and "SIGKILL" not in output and "ChildFailedError" not in output
    assert output.count("interrupt requested") == 1 and output.count("interrupted while running") == 1
    assert not _left_running(out)                         # no process of the run left behind


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="sends SIGINT as a terminal's Ctrl-C does; reads /proc")
def test_ctrl_c_during_start_up_ends_every_process(tmp_path):
    """A press before the processes handle Ctrl-C (start-up: nothing to save) goes to the launcher, which ends
    them; the command exits as interrupted and nothing is left running or waiting."""
    import signal
    import time

    out, proc = _launch_demo_in_two_processes(tmp_path, epochs=400)
    deadline = time.time() + 120
    while _running(out) < 4 and time.time() < deadline:   # the command, the launcher and its 2 processes
        time.sleep(0.05)
    assert not os.listdir(_registry_of(proc))             # the processes are starting: none handles Ctrl-C yet
    proc.send_signal(signal.SIGINT)
    output = _finish(proc, out)
    assert proc.returncode == 130, output[-4000:]
    assert "interrupt requested" in output
    assert not _left_running(out)


@pytest.mark.parametrize("rank", [0, 1])
def test_under_other_launchers_only_process_0_reports_an_interrupt(monkeypatch, capsys, rank):
    """accelerate launch / torchrun: every process is interrupted; one line says so, not one per process. A real
    error of any process is still printed by it."""
    from comfyui_dreambooth import cli
    from comfyui_dreambooth.runner import WorkflowInterrupted

    def interrupted(*args, **kwargs):
        raise WorkflowInterrupted("6", {})
    monkeypatch.setattr("comfyui_dreambooth.runner.run_workflow", interrupted)
    monkeypatch.setattr("comfyui_dreambooth.training.distributed.pin_local_device", lambda: None)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("COMFYUI_DREAMBOOTH_SUPERVISOR", raising=False)
    assert cli.main(["run", "wf.json", "--quiet"]) == 130
    said = capsys.readouterr().err
    assert ("interrupted while running node 6" in said) == (rank == 0)

    def failing(*args, **kwargs):
        raise ValueError("out of disk space")
    monkeypatch.setattr("comfyui_dreambooth.runner.run_workflow", failing)
    assert cli.main(["run", "wf.json", "--quiet"]) == 1
    assert "out of disk space" in capsys.readouterr().err


# ---- issue 24.5 / 24.6: what `run --num-processes` finds before processes start; SIGTERM; Ctrl-C at start-up -----
@pytest.mark.parametrize("count", ["0", "-1"])
def test_num_processes_below_one_is_refused(capsys, count, tmp_path):
    """Issue 24.5: --num-processes 0 and -1 silently ran one process."""
    from comfyui_dreambooth import cli

    code = cli.main(["run", str(tmp_path / "wf.json"), "--num-processes", count, "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and f"--num-processes {count}" in err[0] and "1 or more" in err[0], err


def _never_launched(*args, **kwargs):
    raise AssertionError("no process may start")


@pytest.mark.parametrize("chain, needle", [
    ({"1": {"class_type": "DreamBoothSettings", "inputs": {"mixed_precision": "no"}},
      "2": {"class_type": "DreamBoothOptimizer", "inputs": {"config": ["1", 0], "fused_backward": True,
                                                            "max_grad_norm": 0.0}}}, "fused_backward"),
    ({"2": {"class_type": "DreamBoothImagic", "inputs": {"train_imagic_only": True}}}, "train_imagic_only"),
])
def test_settings_several_processes_refuse_are_found_before_they_start(monkeypatch, capsys, tmp_path, chain, needle):
    """Issue 24.5: fused_backward / Imagic were found only after N processes started: each printed it, then the
    launcher added a 40-60-line ChildFailedError report. Now one line, before any process starts."""
    import subprocess as sp

    from comfyui_dreambooth import cli

    workflow = {**chain, "9": {"class_type": "TrainDreamBooth", "_meta": {"title": "Train"},
                               "inputs": {"model": ["8", 0], "concepts": ["7", 0], "config": ["2", 0]}},
                "8": {"class_type": "LoadBaseModel", "inputs": {}}, "7": {"class_type": "ConceptDataset", "inputs": {}}}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(workflow))
    monkeypatch.setattr(sp, "Popen", _never_launched)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = cli.main(["run", str(path), "--num-processes", "2", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "--num-processes 2" in err[0] and "node 9 (TrainDreamBooth, 'Train')" in err[0] and needle in err[0], err


def test_the_wizard_never_picks_fused_backward_for_several_processes():
    """Issue 24.5: a PerformanceWizard in a `run --num-processes` graph chose fused_backward, which several
    processes refuse."""
    from comfyui_dreambooth.training.wizard import choose_settings

    one = choose_settings("sd15", 4.0, images=4, mode="full").settings
    assert one.fused_backward                               # one process: the saving is used
    several = choose_settings("sd15", 4.0, images=4, mode="full", processes=2).settings
    assert not several.fused_backward and several.validate(check_environment=False) == []


def _until_training(proc, seconds=240):
    import time

    seen, deadline = [], time.time() + seconds
    for line in proc.stdout:
        seen.append(line)
        if ("training " in line and " steps (" in line) or time.time() > deadline:
            break
    time.sleep(3)                                         # a few steps in
    return seen


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="sends signals as a scheduler does; reads /proc")
def test_sigterm_under_num_processes_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    """Issue 24.5: SIGTERM during training ended with a SignalException traceback and no checkpoint. It stops as
    the first Ctrl-C does: every process at the same step, a checkpoint, one line, no process left."""
    import signal

    out, proc = _launch_demo_in_two_processes(tmp_path, epochs=400)
    try:
        seen = _until_training(proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = _finish(proc, out)
    output = "".join(seen) + rest
    assert proc.returncode == 130, output[-4000:]
    runs = [d for d in (out / "dreambooth").iterdir() if (d / "config.json").exists()]
    assert len(runs) == 1 and not json.loads((runs[0] / "config.json").read_text())["finished"], output[-4000:]
    assert [d for d in (runs[0] / "checkpoints").iterdir() if (d / "state.json").exists()], output[-4000:]
    assert "Traceback" not in output and "SignalException" not in output and "ChildFailedError" not in output
    assert output.count("terminate requested") == 1, output[-4000:]
    assert not _left_running(out)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="sends signals as a terminal does; reads /proc")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_during_start_up_is_one_line_even_when_sigint_was_ignored(tmp_path, monkeypatch, sig):
    """Issue 24.6: started from a script with `&` (SIGINT ignored), the launcher inherited the ignored SIGINT and
    the press passed on during start-up was dropped: the run trained to the end with exit 0. Otherwise the press
    printed a 30-line KeyboardInterrupt traceback; SIGTERM at start-up exited 241 with no line."""
    import signal
    import time

    real_popen = subprocess.Popen

    def ignoring_sigint(*args, **kwargs):                 # as `cmd &` from a script starts it
        return real_popen(*args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN), **kwargs)
    monkeypatch.setattr(subprocess, "Popen", ignoring_sigint)
    out, proc = _launch_demo_in_two_processes(tmp_path, epochs=400)
    monkeypatch.setattr(subprocess, "Popen", real_popen)
    deadline = time.time() + 120
    while _running(out) < 2 and time.time() < deadline:   # the command and the launcher: the launcher starting
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(getattr(signal, sig))
    output = _finish(proc, out)
    assert proc.returncode == 130, output[-4000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output and "SignalException" not in output, \
        output[-4000:]
    assert "during start-up" in output and " steps (" not in output, output[-4000:]
    assert not (out / "dreambooth").exists() or not any((out / "dreambooth").glob("*/final")), output[-4000:]
    assert not _left_running(out)


def test_more_processes_than_the_machine_has_devices_is_refused(monkeypatch, capsys, tmp_path):
    """Hostile pass: --num-processes 1000 on a 2-core CPU machine started 1000 processes."""
    import subprocess as sp

    import torch

    from comfyui_dreambooth import cli

    if torch.cuda.is_available():
        pytest.skip("counts CPU cores on a machine without a GPU")
    monkeypatch.setattr(sp, "Popen", _never_launched)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    count = (os.cpu_count() or 1) + 1
    code = cli.main(["run", str(tmp_path / "wf.json"), "--num-processes", str(count), "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and f"--num-processes {count}" in err[0] and "CPU core" in err[0], err


@pytest.mark.slow
def test_a_failing_process_under_num_processes_gives_its_line_without_a_launcher_report(tmp_path):
    """Issue 24.5: after a process failed, torch's launcher added a 40-60-line ChildFailedError report (and its
    own error log line) under the process's one-line message."""
    from comfyui_dreambooth import demo

    out = tmp_path / "out"
    demo.make_tiny_checkpoint(str(out / "checkpoints" / demo.CHECKPOINT_NAME))
    cmd = [sys.executable, "-m", "comfyui_dreambooth", "run", demo.example_workflow_path(), "--output-dir", str(out),
           "--num-processes", "2"]
    for o in demo.demo_overrides(demo.CHECKPOINT_NAME, str(tmp_path / "no such folder"), epochs=1):
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert lines and all(line.startswith("error: ") and "no such folder" in line for line in lines), proc.stderr[-3000:]
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
