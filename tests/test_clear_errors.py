"""Every bad input gets one clear line (issue 10, point 5): the file or setting named, what to do, exit code 1,
no traceback (that is what --debug is for). Each case here leaked an exception, echoed thousands of characters,
or did something silently before it was fixed. CLI cases run in-process (cli.main + capsys), as test_cli.py does."""
import json
import os
import shutil
import warnings

import pytest

from comfyui_dreambooth import cli

LONG = "x" + "/y" * 3000            # 6001 characters: over PATH_MAX, 3001 components (makedirs recursed past the limit)


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, *needles: str) -> str:
    """The error line of a failed command: one line (no traceback) naming each needle, shown whole."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[:2000]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def sd1_file(tiny_files):
    return tiny_files["sd1"]["safetensors"]


def sample_graph(model_path: str, **sample_inputs) -> dict:
    inputs = {"model": ["1", 0], "prompt": "a photo of sks dog", "negative_prompt": "", "steps": 1, "cfg": 5.0,
              "seed": 1, "width": 64, "height": 64, "batch_size": 1, "scheduler": "euler", "clip_skip": 0,
              "filename_prefix": "db/test"}
    inputs.update(sample_inputs)
    return {"1": {"class_type": "LoadBaseModel", "_meta": {"title": "Base"},
                  "inputs": {"model": "(use model_path)", "model_path": model_path, "prediction_type": "auto",
                             "dtype": "fp32"}},
            "2": {"class_type": "SampleTrained", "_meta": {"title": "Sample"}, "inputs": inputs}}


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fails the test if any node of the pack executes (validation must refuse the graph first)."""
    from comfyui_dreambooth.nodes.models import LoadBaseModel

    def refuse(*args, **kwargs):
        raise AssertionError("a node ran before the graph was refused")

    monkeypatch.setattr(LoadBaseModel, "load", refuse)


# --- graph validation before anything runs --------------------------------------------------------------------------
@pytest.mark.parametrize("width, why", [(65, "multiple of 64"), (32, "at least 64"), (8192, "at most 4096")])
def test_sample_trained_size_is_refused_before_any_node_runs(capsys, tmp_path, sd1_file, nothing_runs, width, why):
    wf = write_json(tmp_path / "wf.json", sample_graph(sd1_file, width=width))
    code, _, err = run_cli(capsys, "run", wf, "--quiet", "--output-dir", tmp_path / "out")
    assert code == 1
    one_line(err, "validation error", "'Sample'", "width", why)


def test_sample_trained_size_allows_the_widget_values():
    from comfyui_dreambooth.nodes.models import SampleTrained

    assert SampleTrained.VALIDATE_INPUTS(width=64, height=4096) is True
    assert SampleTrained.VALIDATE_INPUTS(width=None, height=512) is True      # linked: checked when it arrives


def _save_graph(sd1_file, class_type, name_input, name):
    extra = {"format": "safetensors"} if class_type == "SaveCheckpoint" else {}
    return {"1": {"class_type": "LoadBaseModel",
                  "inputs": {"model": "(use model_path)", "model_path": sd1_file, "prediction_type": "auto",
                             "dtype": "fp32"}},
            "2": {"class_type": class_type, "_meta": {"title": "Save"},
                  "inputs": {"model": ["1", 0], name_input: name, "dtype": "fp16", **extra}}}


@pytest.mark.parametrize("class_type, name_input", [("SaveLoRA", "filename"), ("SaveCheckpoint", "filename"),
                                                    ("SaveDiffusers", "folder_name")])
def test_a_save_name_too_long_in_bytes_is_refused_before_training(capsys, tmp_path, sd1_file, nothing_runs,
                                                                   class_type, name_input):
    name = "é" * 200                       # 200 characters, 400 bytes: over the 255 bytes a file name may have
    wf = write_json(tmp_path / "wf.json", _save_graph(sd1_file, class_type, name_input, name))
    code, _, err = run_cli(capsys, "run", wf, "--quiet", "--output-dir", tmp_path / "out")
    assert code == 1
    line = one_line(err, "validation error", name_input, "bytes")
    assert len(line) < 600


def test_save_names_within_the_limit_pass_and_unvalidated_ones_are_shortened(tmp_path):
    from comfyui_dreambooth.nodes.save import SaveLoRA
    from comfyui_dreambooth.training.export.naming import safe_output_path

    assert SaveLoRA.VALIDATE_INPUTS(filename="a" * 200) is True        # 200 ASCII characters fit
    assert SaveLoRA.VALIDATE_INPUTS(filename="people/" + "é" * 100) is True
    assert SaveLoRA.VALIDATE_INPUTS(filename=None) is True              # linked: arrives after validation
    # a name that reaches the save without validation (a linked STRING) is cut to fit rather than lose the run
    path = safe_output_path(str(tmp_path), "é" * 200, ".safetensors")
    assert path.endswith(".safetensors") and len(os.fsencode(os.path.basename(path))) <= 255 - 24
    with open(path, "wb"):
        pass


