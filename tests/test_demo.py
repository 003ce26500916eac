"""`comfyui-dreambooth demo --tiny`: tiny model + drawn concept -> the LoRA example workflow headless -> LoRA, samples
and a loss plot, in well under a minute on 2 CPU cores (one real run, shared by the tests of this file). The default
demo (the toy world) is tests/test_demo_toy.py."""
import contextlib
import io
import os
import re
import time

import pytest
from PIL import Image

from comfyui_dreambooth import cli, demo

DEMO_TIME_LIMIT_S = float(os.environ.get("DEMO_TIME_LIMIT_S", "60"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    printed, errors = io.StringIO(), io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        rc = cli.main(["demo", "--tiny", "--output-dir", str(out), "--quiet"])
    return {"out": out, "rc": rc, "stdout": printed.getvalue(), "stderr": errors.getvalue(),
            "seconds": time.monotonic() - started}


def printed_path(stdout: str, label: str) -> list[str]:
    return [m.group(1) for m in re.finditer(rf"^  {label}\s+(\S+)", stdout, re.M)]


@pytest.mark.slow
def test_demo_finishes_within_the_time_limit(demo_run):
    assert demo_run["rc"] == 0, demo_run["stdout"] + demo_run["stderr"]
    assert demo_run["seconds"] < DEMO_TIME_LIMIT_S, f"demo took {demo_run['seconds']:.1f}s"


@pytest.mark.slow
def test_demo_prints_where_everything_is(demo_run):
    stdout, out = demo_run["stdout"], str(demo_run["out"])
    assert "demo finished" in stdout
    for label in ("base model", "run folder", "LoRA", "sample", "loss plot"):
        paths = printed_path(stdout, label)
        assert paths, f"no '{label}' line in:\n{stdout}"
        assert all(p.startswith(out) and os.path.exists(p) for p in paths), (label, paths)


@pytest.mark.slow
def test_demo_inputs_the_tiny_model_and_concept_images(demo_run):
    out = demo_run["out"]
    assert (out / "checkpoints" / demo.CHECKPOINT_NAME).is_file()
    images = sorted((out / "input" / demo.CONCEPT_FOLDER).glob("*.png"))
    assert len(images) == demo.NUM_IMAGES
    assert all(Image.open(p).size == (demo.IMAGE_SIZE, demo.IMAGE_SIZE) for p in images)


@pytest.mark.slow
def test_demo_lora_loads_and_holds_trained_adapters(demo_run):
    from comfyui_dreambooth.training.export.lora import load_kohya_lora

    state, metadata = load_kohya_lora(str(demo_run["out"] / "loras" / (demo.LORA_NAME + ".safetensors")))
    assert any(k.startswith("lora_unet_") for k in state) and any(k.startswith("lora_te_") for k in state)
    ups = [v for k, v in state.items() if k.endswith("lora_up.weight")]
    assert ups and any(float(v.float().abs().max()) > 0 for v in ups)     # trained: not the zero init
    assert metadata["ss_network_dim"] == "4" and metadata["ss_resolution"] == str(demo.IMAGE_SIZE)


@pytest.mark.slow
def test_demo_samples_and_run_folder(demo_run):
    stdout, out = demo_run["stdout"], demo_run["out"]
    samples = printed_path(stdout, "sample")
    assert len(samples) == 2 and all(Image.open(p).size == (demo.IMAGE_SIZE, demo.IMAGE_SIZE) for p in samples)
    run_dir = printed_path(stdout, "run folder")[0]
    records = demo.read_loss_log(run_dir)
    steps = 2 * demo.NUM_IMAGES * demo.EPOCHS             # instance + class image per instance image, per epoch
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert os.path.isfile(os.path.join(run_dir, "config.json"))
    assert f"{steps} training steps" in stdout


@pytest.mark.slow
def test_demo_loss_plot_is_drawn(demo_run):
    plot = Image.open(demo_run["out"] / demo.LOSS_PLOT).convert("RGB")
    assert plot.size == (640, 360)
    colours = {c for _, c in plot.getcolors(1 << 16)}
    assert (20, 70, 170) in colours and (150, 190, 235) in colours     # smoothed and raw curves


@pytest.mark.slow
def test_demo_reuses_the_finished_run_on_a_second_call(demo_run):
    """Same inputs -> the trainer reuses the run (fast), the LoRA is overwritten under the same name."""
    started = time.monotonic()
    result = demo.run_demo(str(demo_run["out"]), show_progress=False, stream=io.StringIO())
    assert result.lora.endswith(demo.LORA_NAME + ".safetensors")
    assert result.run_dir == printed_path(demo_run["stdout"], "run folder")[0]
    assert time.monotonic() - started < demo_run["seconds"]


# --- pieces, no training ------------------------------------------------------------------------------------------
def test_plot_loss_without_records_and_with_one(tmp_path):
    empty = Image.open(demo.plot_loss([], str(tmp_path / "empty.png"))).convert("RGB")
    assert empty.size == (640, 360)
    one = Image.open(demo.plot_loss([{"step": 1, "loss": 0.5}], str(tmp_path / "one.png"))).convert("RGB")
    assert (20, 70, 170) in {c for _, c in one.getcolors(1 << 16)}


def test_read_loss_log_skips_bad_lines(tmp_path):
    (tmp_path / "loss.jsonl").write_text('{"step": 1, "loss": 0.5}\nnot json\n{"step": 2, "loss": NaN}\n'
                                         '{"step": 3, "loss": 0.25}\n')
    assert [r["step"] for r in demo.read_loss_log(str(tmp_path))] == [1, 3]
    assert demo.read_loss_log(str(tmp_path / "missing")) == []


def test_smoothed_is_a_debiased_average():
    assert demo.smoothed([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    values = demo.smoothed([0.0, 10.0])
    assert values[0] == 0.0 and 0.0 < values[1] < 10.0


def test_concept_images_are_deterministic_and_distinct(tmp_path):
    first = demo.make_concept_images(str(tmp_path / "a"))
    second = demo.make_concept_images(str(tmp_path / "b"))
    assert [open(p, "rb").read() for p in first] == [open(p, "rb").read() for p in second]
    assert len({open(p, "rb").read() for p in first}) == len(first)


def test_overrides_target_the_example_workflow():
    """Every override names a node title and input of the shipped LoRA example (checked by the runner)."""
    from comfyui_dreambooth import runner

    prepared = runner.prepare_workflow(demo.example_workflow_path(),
                                       overrides=demo.demo_overrides("x.safetensors", "/tmp/concept"))
    titles = {n["_meta"]["title"]: n["inputs"] for n in prepared.prompt.values()}
    assert titles["Data"]["resolution"] == demo.IMAGE_SIZE
    assert titles["Settings"]["steps_per_image"] == demo.EPOCHS
    assert titles["Concept"]["instance_dir"] == "/tmp/concept"


def test_torch_threads_are_restored():
    import torch

    before = torch.get_num_threads()
    with demo.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_bad_thread_count_is_a_clear_error(capsys):
    assert cli.main(["demo", "--threads", "0"]) == 1
    assert "--threads 0: must be at least 1" in capsys.readouterr().err


def test_demo_help_is_instant():
    with pytest.raises(SystemExit) as info, contextlib.redirect_stdout(io.StringIO()) as printed:
        cli.main(["demo", "--help"])
    assert info.value.code == 0 and "--output-dir" in printed.getvalue()
