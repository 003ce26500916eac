"""The TrainDreamBooth node, headless and inside a (fake) ComfyUI: outputs, UI payload, live reporting,
Cancel -> resumable checkpoint + ComfyUI's interrupt, panel stop, and re-queueing."""
import json
import os
import sys
import types

import pytest
import torch

from comfyui_dreambooth.nodes import comfy_compat as compat
from comfyui_dreambooth.nodes import live, live_routes
from comfyui_dreambooth.nodes.train import TrainDreamBooth
from trainer_fixtures import make_concept, read_losses, tiny_settings


pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one torch thread, a fresh tiny sd1 per module


@pytest.fixture
def headless(tmp_path):
    compat.set_output_directory(str(tmp_path / "output"))
    compat.clear_interrupt()
    live.clear_states()
    messages = []
    remove = compat.add_ui_listener(lambda event, data: messages.append((event, data)))
    yield messages
    remove()
    compat.clear_interrupt()
    compat.set_output_directory(None)
    live.clear_states()


def test_node_contract():
    spec = TrainDreamBooth.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "concepts", "config"]
    assert [spec["required"][k][0] for k in ("model", "concepts", "config")] == ["DB_MODEL", "CONCEPTS", "DB_CONFIG"]
    assert list(spec["optional"]) == ["resume"]
    for name, (kind, opts) in {**spec["required"], **spec["optional"]}.items():
        assert opts.get("tooltip"), name
    assert TrainDreamBooth.RETURN_TYPES == ("DB_MODEL", "STRING", "STRING")
    assert TrainDreamBooth.OUTPUT_NODE and TrainDreamBooth.CATEGORY.startswith("DreamBooth")


@pytest.mark.slow
def test_headless_run_returns_model_run_dir_report_and_ui(sd1, tmp_path, headless):
    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(steps_per_image=2, preview_every_epochs=1, preview_steps=1)
    out = TrainDreamBooth().train(sd1, [concept], settings, unique_id="7")
    model, run_dir, report = out["result"]
    assert model is not sd1 and model.metadata["adapter"]["rank"] == 4
    output = os.path.realpath(compat.output_directory())
    assert os.path.realpath(run_dir).startswith(os.path.join(output, "dreambooth") + os.sep)
    assert "Trained 4 steps" in report and run_dir in report and "examples" in report.lower()
    assert out["ui"]["text"] == [report]
    images = out["ui"]["images"]
    assert [i["filename"] for i in images] == ["epoch-00001_0.png", "epoch-00002_0.png"]
    for image in images:
        assert image["type"] == "output" and not os.path.isabs(image["subfolder"])
        assert os.path.exists(os.path.join(output, image["subfolder"], image["filename"]))

    state = live.get_state("7")
    assert state["state"] == "done" and state["step"] == state["total"] == 4
    assert [p[0] for p in state["loss_history"]] == [1, 2, 3, 4]
    assert state["previews"] and state["previews"][-1]["filename"] == "epoch-00002_0.png"
    events = {event for event, _ in headless}
    assert {live.PROGRESS_EVENT, live.PREVIEW_EVENT, live.STATUS_EVENT} <= events
    # issue 10.3: the state and the messages every tab gets name the run relative to the output folder, and no
    # absolute path at all (the concept's images live outside ComfyUI's folders here: named by their last part)
    assert state["run_dir"] == "output/" + os.path.relpath(os.path.realpath(run_dir), output).replace(os.sep, "/")
    assert state["message"] == "finished " + state["run_dir"]
    everything = json.dumps([live_routes.state_response()[1], headless])
    assert str(tmp_path) not in everything and os.path.realpath(str(tmp_path)) not in everything

    # re-queueing the same graph after a restart: the finished run is found on disk, nothing retrains
    again = TrainDreamBooth().train(sd1, [concept], settings, unique_id="7")
    assert again["result"][1] == run_dir and again["result"][2].startswith("Reused 4 steps")


def test_problem_files_and_stages_reach_the_console_the_report_and_the_panel(sd1, tmp_path, headless, capsys):
    """Issue 9: broken / duplicate / non-image files are printed (one line each, naming the file) and listed in the
    node's text; the panel's status line names each preparation stage and says "training" once steps run
    (it kept "preparing the data (data): 8/8" for the whole run)."""
    concept = make_concept(tmp_path, n=2)
    inst = concept.instance_dir
    with open(os.path.join(inst, "img_0.png"), "rb") as f:
        data = f.read()
    with open(os.path.join(inst, "copy.png"), "wb") as f:
        f.write(data)
    with open(os.path.join(inst, "broken.png"), "w") as f:
        f.write("not an image")
    with open(os.path.join(inst, "notes.md"), "w") as f:
        f.write("x")
    capsys.readouterr()
    out = TrainDreamBooth().train(sd1, [concept], tiny_settings(steps_per_image=2), unique_id="5")
    printed = capsys.readouterr().out.splitlines()
    report = out["result"][2]
    assert out["ui"]["text"] == [report]
    for kind, name in (("BAD", "broken.png"), ("DUPLICATE", "copy.png"), ("IGNORED", "notes.md")):
        path = os.path.join(inst, name)
        assert len([line for line in printed if line.startswith("[DreamBooth] concept 1: ")
                    and kind in line and path in line]) == 1, (kind, printed)
        assert len([line for line in report.splitlines() if kind in line and path in line]) == 1, (kind, report)

    statuses = [(i, d) for i, (event, d) in enumerate(headless) if event == live.STATUS_EVENT and d["node"] == "5"]
    first_step = next(i for i, (event, d) in enumerate(headless) if event == live.PROGRESS_EVENT)
    preparing = [d["message"] for i, d in statuses if i < first_step]
    assert any(m.startswith("caching latents") and m.endswith("/2") for m in preparing), preparing
    assert not any("(data)" in m for m in preparing), preparing
    during = [d for i, d in statuses if i > first_step][:-1]           # the last one is "done"
    assert during and all(d["state"] == "running" and d["message"] == "training" for d in during), during
    assert statuses[-1][1]["state"] == "done"


def test_the_resume_lines_of_both_trainers_are_recognised(tmp_path):
    from comfyui_dreambooth.nodes.train import RESUMING, resumed_points

    run = tmp_path / "run with spaces"
    run.mkdir()
    (run / "loss.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in (1, 2, 3)))
    for line in (f"resuming {run} from step 2", f"resuming {run} from step 2 (Imagic stage 1)"):
        found = RESUMING.match(line)
        assert found and found.group(1) == str(run) and found.group(2) == "2", line
        assert resumed_points(found.group(1), int(found.group(2))) == [[1, 1.0], [2, 0.5]]
    assert resumed_points(str(tmp_path / "missing"), 3) == []
    assert not RESUMING.match(f"resuming from {run} instead of the damaged x")


def _interrupt_at_first_progress(messages_sink, request):
    def listener(event, data):
        if event == live.PROGRESS_EVENT and data.get("step") == 1:
            request()
    return listener


@pytest.mark.slow
def test_headless_cancel_saves_a_resumable_checkpoint_then_raises_the_interrupt(sd1, tmp_path, headless):
    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(steps_per_image=2)
    remove = compat.add_ui_listener(_interrupt_at_first_progress(headless, compat.request_interrupt))
    try:
        with pytest.raises(compat.InterruptRequested):
            TrainDreamBooth().train(sd1, [concept], settings, unique_id="8")
    finally:
        remove()
    assert live.get_state("8")["state"] == "interrupted"
    runs = os.path.join(compat.output_directory(), "dreambooth")
    (run_name,) = [d for d in os.listdir(runs) if d != "cache"]
    run_dir = os.path.join(runs, run_name)
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["step-0000001"]
    assert [r["step"] for r in read_losses(run_dir)] == [1]

    compat.clear_interrupt()
    out = TrainDreamBooth().train(sd1, [concept], settings, unique_id="8")       # queue again: resumes
    assert out["result"][1] == run_dir and [r["step"] for r in read_losses(run_dir)] == [1, 2, 3, 4]
    # issue 23.6: the resumed run's chart starts at step 1 (the loss of the steps before the stop included)
    state = live.get_state("8")
    assert [p[0] for p in state["loss_history"]] == [1, 2, 3, 4]
    assert state["loss_history"][0][1] == pytest.approx(read_losses(run_dir)[0]["loss"])
    first = [d for event, d in headless if event == live.PROGRESS_EVENT and d["run"] == state["run"]][0]
    assert [p[0] for p in first["points"]] == [1, 2]          # the browser gets the earlier points too


def _checkpoint_weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "checkpoints", f"step-{step:07d}", "trainable.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("action, stop_step", [("stop_now", 1), ("stop_after_epoch", 2)])
def test_stop_from_the_panel_ends_the_node_with_the_checkpoint_model(sd1, tmp_path, headless, action, stop_step):
    """Issue 23.2: a requested stop is not an error: the node returns the model its checkpoint holds (nodes after
    it run), says "stopped at step N (checkpoint saved)" on the node and the panel (no ETA), and the run resumes on
    the next queue, which ComfyUI does not answer from its cache."""
    from comfyui_dreambooth.training.control import find_control

    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(steps_per_image=2)          # 2 images: 2 steps an epoch, 4 in all
    changed_before = TrainDreamBooth.IS_CHANGED(model=None, concepts=None, config=None, resume="auto")
    remove = compat.add_ui_listener(_interrupt_at_first_progress(headless, lambda: find_control("9").apply(action)))
    try:
        out = TrainDreamBooth().train(sd1, [concept], settings, unique_id="9")
    finally:
        remove()
    model, run_dir, summary = out["result"]
    assert summary.startswith(f"Stopped at step {stop_step} (checkpoint saved)") and run_dir in summary
    assert out["ui"]["text"] == [summary]
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == [f"step-{stop_step:07d}"]
    saved = _checkpoint_weights(run_dir, stop_step)
    params = dict(model.unet.named_parameters())
    assert saved and all(torch.equal(params[name[len("unet."):]].detach().cpu(), tensor)
                         for name, tensor in saved.items() if name.startswith("unet."))
    assert model is not sd1 and not any(p.requires_grad for p in params.values())
    state = live.get_state("9")
    assert state["state"] == "stopped" and state["message"] == f"stopped at step {stop_step} (checkpoint saved)"
    assert state["eta_s"] is None
    assert TrainDreamBooth.IS_CHANGED(model=None, concepts=None, config=None, resume="auto") != changed_before

    again = TrainDreamBooth().train(sd1, [concept], settings, unique_id="9")   # queue again: resumes, finishes
    assert again["result"][1] == run_dir and [r["step"] for r in read_losses(run_dir)] == [1, 2, 3, 4]
    assert again["result"][2].startswith("Trained 4 steps")


def test_save_now_from_the_panel_is_confirmed_when_written(sd1, tmp_path, headless):
    """Issue 23.3: Save now shows "saving a checkpoint at step N…", then "saved step N" once the trainer wrote it."""
    from comfyui_dreambooth.training.control import find_control

    concept = make_concept(tmp_path, n=2)
    remove = compat.add_ui_listener(_interrupt_at_first_progress(headless, lambda: find_control("12").request_save()))
    try:
        out = TrainDreamBooth().train(sd1, [concept], tiny_settings(steps_per_image=2), unique_id="12")
    finally:
        remove()
    run_dir = out["result"][1]
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step-0000001"))
    said = [(d["state"], d["message"]) for event, d in headless if event == live.STATUS_EVENT and d["node"] == "12"]
    saving = said.index(("saving", "saving a checkpoint at step 1…"))
    assert said[saving + 1] == ("running", "saved step 1") and said[-1][0] == "done"


def test_errors_reach_the_panel(sd1, tmp_path, headless):
    concept = make_concept(tmp_path, n=1).replace(instance_dir=str(tmp_path / "missing"))
    with pytest.raises(Exception, match="missing"):
        TrainDreamBooth().train(sd1, [concept], tiny_settings(), unique_id="10")
    assert live.get_state("10")["state"] == "error"


# ---- inside a (fake) ComfyUI ----------------------------------------------------------------------------------------
@pytest.fixture
def fake_comfy(tmp_path, monkeypatch):
    """folder_paths / comfy.utils / comfy.model_management / server, as far as the node uses them."""
    calls = []
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_output_directory = lambda: str(tmp_path / "ComfyUI" / "output")
    folder_paths.get_input_directory = lambda: str(tmp_path / "ComfyUI" / "input")
    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            calls.append(("ProgressBar", total))

        def update_absolute(self, value, total=None, preview=None):
            calls.append(("update", value, total))
    utils.ProgressBar = ProgressBar

    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass
    mm.InterruptProcessingException = InterruptProcessingException
    mm.flag = False
    mm.interrupt_current_processing = lambda value=True: setattr(mm, "flag", value)
    mm.processing_interrupted = lambda: mm.flag

    def throw():                       # like ComfyUI: raising consumes the flag
        if mm.flag:
            mm.flag = False
            raise InterruptProcessingException()
    mm.throw_exception_if_processing_interrupted = throw
    mm.unload_all_models = lambda: calls.append("unload_all_models")
    mm.soft_empty_cache = lambda: calls.append("soft_empty_cache")
    mm.get_torch_device = lambda: torch.device("cpu")

    server = types.ModuleType("server")

    class Instance:
        routes = []
        last_prompt_id = "prompt-7"      # main.py's prompt worker sets it before executing a prompt

        def send_sync(self, event, data, sid=None):
            calls.append(("send_sync", event, data))
            if event == live.PROGRESS_EVENT and data.get("step") == 1 and mm.cancel_at_step_1:
                mm.flag = True         # the user presses Cancel
    mm.cancel_at_step_1 = False
    server.PromptServer = type("PromptServer", (), {"instance": Instance()})
    comfy.utils, comfy.model_management = utils, mm
    for name, module in {"folder_paths": folder_paths, "comfy": comfy, "comfy.utils": utils,
                         "comfy.model_management": mm, "server": server}.items():
        monkeypatch.setitem(sys.modules, name, module)
    live.clear_states()
    yield types.SimpleNamespace(calls=calls, mm=mm, output=tmp_path / "ComfyUI" / "output")
    live.clear_states()


def test_inside_comfyui_under_inference_mode(sd1, tmp_path, fake_comfy):
    concept = make_concept(tmp_path, n=2)
    with torch.inference_mode():                      # how ComfyUI's executor calls every node
        out = TrainDreamBooth().train(sd1, [concept], tiny_settings(steps_per_image=1), unique_id="3")
    model, run_dir, _ = out["result"]
    assert run_dir.startswith(str(fake_comfy.output))
    calls = fake_comfy.calls
    assert calls.index("unload_all_models") < calls.index(("ProgressBar", 1))       # VRAM freed before training
    assert calls.index(("update", 2, 2)) < len(calls) - 1 - calls[::-1].index("soft_empty_cache")   # and after
    assert [c for c in calls if c[0] == "update"] == [("update", 1, 2), ("update", 2, 2)]
    assert any(c[0] == "send_sync" and c[1] == live.PROGRESS_EVENT for c in calls)
    # issue 23.1: the run is bound to the prompt that started it (panels of other workflows do not show it)
    assert live.get_state("3")["prompt"] == "prompt-7"
    assert all(c[2]["prompt"] == "prompt-7" for c in calls if c[0] == "send_sync")
    # the trained model works for sampling afterwards (outside the executor's inference mode too)
    assert not model.unet.conv_in.weight.is_inference()


def test_inside_comfyui_cancel_raises_comfys_interrupt_after_saving(sd1, tmp_path, fake_comfy):
    concept = make_concept(tmp_path, n=2)
    fake_comfy.mm.cancel_at_step_1 = True
    with pytest.raises(fake_comfy.mm.InterruptProcessingException):
        with torch.inference_mode():
            TrainDreamBooth().train(sd1, [concept], tiny_settings(steps_per_image=2), unique_id="4")
    runs = fake_comfy.output / "dreambooth"
    (run_name,) = [d for d in os.listdir(runs) if d != "cache"]
    assert os.listdir(runs / run_name / "checkpoints") == ["step-0000001"]
    assert live.get_state("4")["state"] == "interrupted"


def test_save_lora_after_a_full_fine_tune_is_refused_before_training(sd1, tmp_path, headless):
    """Issue 24.1: a SaveLoRA fed by a Train node whose config is a full fine-tune (the wizard's auto choice, or
    use_lora off) failed only after the whole run ("this model has no LoRA adapters"). The Train node sees the
    graph (hidden PROMPT) and refuses before any work; a SaveCheckpoint there, or a LoRA config, is fine."""
    concept = make_concept(tmp_path, n=2)
    prompt = {"3": {"class_type": "TrainDreamBooth", "inputs": {}},
              "7": {"class_type": "SaveLoRA", "inputs": {"model": ["3", 0], "filename": "x"},
                    "_meta": {"title": "Save my LoRA"}},
              "8": {"class_type": "SaveCheckpoint", "inputs": {"model": ["3", 0]}}}
    assert TrainDreamBooth.INPUT_TYPES()["hidden"]["prompt"] == "PROMPT"
    with pytest.raises(ValueError) as e:
        TrainDreamBooth().train(sd1, [concept], tiny_settings(use_lora=False), unique_id="3", prompt=prompt)
    message = str(e.value)
    assert "SaveLoRA" in message and "Save my LoRA" in message and "use_lora" in message, message
    assert "SaveCheckpoint" in message and "\n" not in message, message
    assert not os.path.exists(os.path.join(compat.output_directory(), "dreambooth")), "nothing may be written"
    del prompt["7"]
    TrainDreamBooth().train(sd1, [concept], tiny_settings(use_lora=False, steps_per_image=1), unique_id="3",
                            prompt=prompt)
