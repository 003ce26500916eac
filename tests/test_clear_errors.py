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


# --- workflow files ---------------------------------------------------------------------------------------------------
def test_a_deeply_nested_workflow_is_refused_in_one_line(capsys, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli(capsys, "run", deep, "--output-dir", tmp_path / "out")
    assert code == 1
    one_line(err, str(deep), "too deeply nested")
    assert "unexpected" not in err and "RecursionError" not in err


def test_a_deeply_nested_set_value_is_refused_in_one_line(capsys, tmp_path, sd1_file):
    wf = write_json(tmp_path / "wf.json", sample_graph(sd1_file))
    value = "[" * 100_000 + "]" * 100_000
    code, _, err = run_cli(capsys, "run", wf, "--quiet", "--output-dir", tmp_path / "out", "--set", f"Sample.prompt={value}")
    assert code == 1
    line = one_line(err, "--set", "too deeply nested")
    assert len(line) < 1000 and "RecursionError" not in line


# --- long paths: never echoed whole, never a RecursionError / ENAMETOOLONG traceback ------------------------------
@pytest.mark.parametrize("command", ["info", "sample", "run"])
def test_a_very_long_path_is_shortened_in_the_message(capsys, tmp_path, command):
    extra = ["--prompt", "x", "--out", str(tmp_path / "a.png")] if command == "sample" else []
    code, _, err = run_cli(capsys, command, LONG, *extra)
    assert code == 1
    line = one_line(err, "x/y/y/y", "...")
    assert len(line) < 500, len(line)


def test_a_very_long_output_dir_is_refused_in_one_line(capsys, tmp_path, sd1_file, monkeypatch):
    wf = write_json(tmp_path / "wf.json", sample_graph(sd1_file))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "run", wf, "--quiet", "--output-dir", LONG)
    assert code == 1
    line = one_line(err, "--output-dir", "too long")
    assert len(line) < 500 and "RecursionError" not in line
    assert not os.path.exists(tmp_path / "x"), "nothing is created for a refused output folder"


def test_a_very_long_model_path_or_prefix_is_one_short_line(capsys, tmp_path, sd1_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wf = write_json(tmp_path / "wf.json", sample_graph("/" + LONG))
    code, _, err = run_cli(capsys, "run", wf, "--quiet", "--output-dir", tmp_path / "out")
    assert code == 1
    assert len(one_line(err, "model_path", "...")) < 600

    wf = write_json(tmp_path / "wf.json", sample_graph(sd1_file, filename_prefix=LONG))
    code, _, err = run_cli(capsys, "run", wf, "--quiet", "--output-dir", tmp_path / "out")
    assert code == 1
    line = one_line(err, "filename_prefix", "too long", "validation error")
    assert len(line) < 600 and "RecursionError" not in line


def test_a_very_long_instance_dir_is_one_short_line(capsys, tmp_path):
    from comfyui_dreambooth.nodes.concepts import ConceptDataset

    defaults = {name: spec[1].get("default") for name, spec in ConceptDataset.INPUT_TYPES()["required"].items()}
    wf = write_json(tmp_path / "wf.json", {"1": {"class_type": "ConceptDataset", "_meta": {"title": "Concept"},
                                                 "inputs": {**defaults, "instance_dir": "/" + LONG}}})
    code, _, err = run_cli(capsys, "run", wf, "--quiet", "--output-dir", tmp_path / "out")
    assert code == 1
    assert len(one_line(err, "instance_dir", "...")) < 600


# --- model files ----------------------------------------------------------------------------------------------------
def _pickle_payload_bin(path: str, tensors: dict, marker: str) -> None:
    import torch

    class Payload:                       # unpickling it would run `touch marker`
        def __reduce__(self):
            return (os.system, (f"touch '{marker}'",))

    torch.save({**tensors, "payload": Payload()}, path)


def test_a_pickle_payload_in_a_diffusers_text_encoder_is_refused_and_never_runs(capsys, tmp_path, tiny_files):
    from safetensors.torch import load_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_files["sd1"]["diffusers"], folder)
    te = folder / "text_encoder"
    marker = tmp_path / "PAYLOAD_RAN"
    _pickle_payload_bin(str(te / "pytorch_model.bin"), load_file(str(te / "model.safetensors")), str(marker))
    (te / "model.safetensors").unlink()

    for command in ("info", "sample"):
        extra = ["--prompt", "x", "--out", str(tmp_path / "a.png")] if command == "sample" else []
        code, _, err = run_cli(capsys, command, folder, *extra)
        assert code == 1
        line = one_line(err, os.path.join("text_encoder", "pytorch_model.bin"), "refused")
        assert "unexpected" not in line and "UnpicklingError" not in line
    assert not marker.exists(), "the pickle payload ran"
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("family, stored", [
    ("sd1", [1, 2]),                                               # a list where an object belongs
    ("sd1", {"family": "sd1", "text_encoders": "abc"}),           # a string where a list belongs
    ("sd1", {"family": "sd1", "text_encoders": [5]}),
    ("sd1", {"family": "sd1", "unet": [1]}),
    ("sd1", {"family": "sd1", "vae": "x"}),
    ("sd1", {"family": "sd1", "unet": {"bogus_key": 1}}),          # a key the UNet does not take
    ("sdxl", {"family": "sdxl", "text_encoders": [None]}),        # one entry for two encoders
    ("sd1", "{not json"),
])
def test_malformed_pack_metadata_falls_back_to_the_weights(tmp_path, tiny_files, family, stored):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from comfyui_dreambooth.training.models import load_model
    from comfyui_dreambooth.training.models.state_dict import CONFIG_METADATA_KEY

    source = tiny_files[family]["safetensors"]
    with safe_open(source, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata() or {})
    if isinstance(stored, dict) and "unet" in stored and isinstance(stored["unet"], dict):
        stored = {**stored, "unet": {**json.loads(metadata[CONFIG_METADATA_KEY])["unet"], **stored["unet"]}}
    metadata[CONFIG_METADATA_KEY] = stored if isinstance(stored, str) else json.dumps(stored)
    bad = tmp_path / f"bad_{family}.safetensors"
    save_file(tensors, str(bad), metadata=metadata)

    good = load_model(source)
    with pytest.warns(UserWarning, match=r"bad_\w+\.safetensors.*(ignored|ignoring)"):
        model = load_model(str(bad))
    # the same weights in the same architecture (inference cannot know e.g. sample_size: only the weights count)
    assert list(model.unet.config.block_out_channels) == list(good.unet.config.block_out_channels)
    assert [te.config.num_hidden_layers for te in model.text_encoders] == \
        [te.config.num_hidden_layers for te in good.text_encoders]
    assert model.unet.state_dict().keys() == good.unet.state_dict().keys()
    for key, value in good.unet.state_dict().items():
        assert model.unet.state_dict()[key].equal(value), key


def test_the_cli_shows_a_malformed_stored_config_as_one_warning_line(capsys, tmp_path, tiny_files):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from comfyui_dreambooth.training.models.state_dict import CONFIG_METADATA_KEY

    with safe_open(tiny_files["sd1"]["safetensors"], "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {**(f.metadata() or {}), CONFIG_METADATA_KEY: "[1, 2]"}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    code, out, err = run_cli(capsys, "info", bad)
    assert code == 0 and json.loads(out)["family"] == "sd1"
    assert err.splitlines() == [f"warning: {bad}: ignoring the pack's stored config ({CONFIG_METADATA_KEY} metadata): "
                                f"it is a list, not an object; the architecture is inferred from the weights instead"]


def test_well_formed_pack_metadata_loads_without_a_warning(tiny_files):
    from comfyui_dreambooth.training.models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_model(tiny_files["sd1"]["safetensors"])


# --- sample options -------------------------------------------------------------------------------------------------
def _sample(capsys, model, out, *options):
    return run_cli(capsys, "sample", model, "--prompt", "a photo", "--out", out, "--steps", "1", "--width", "64",
                   "--height", "64", *options)


@pytest.mark.parametrize("value", ["99", "-1"])
def test_clip_skip_outside_the_text_encoder_is_refused(capsys, tmp_path, sd1_file, value):
    out = tmp_path / "a.png"
    code, _, err = _sample(capsys, sd1_file, out, "--clip-skip", value)
    assert code == 1
    line = one_line(err, f"--clip-skip {value}", "1..2")       # the tiny model's CLIP has 2 layers
    assert "unexpected" not in line
    assert not out.exists()


@pytest.mark.parametrize("value", [str(2 ** 64), "-1"])
def test_a_seed_outside_0_to_2_64_is_refused(capsys, tmp_path, sd1_file, value):
    out = tmp_path / "a.png"
    code, _, err = _sample(capsys, sd1_file, out, "--seed", value)
    assert code == 1
    one_line(err, f"--seed {value}", str(2 ** 64 - 1))
    assert not out.exists()


def test_the_last_seed_of_a_batch_must_fit_too(capsys, tmp_path, sd1_file):
    code, _, err = _sample(capsys, sd1_file, tmp_path / "a.png", "--seed", str(2 ** 64 - 1), "--batch", "2")
    assert code == 1
    one_line(err, "--seed", "--batch")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(capsys, tmp_path, sd1_file, value):
    out = tmp_path / "a.png"
    code, _, err = _sample(capsys, sd1_file, out, f"--cfg={value}")
    assert code == 1
    one_line(err, "--cfg", "finite number")
    assert not out.exists()


def test_sample_refuses_to_overwrite_unless_asked(capsys, tmp_path, sd1_file):
    out = tmp_path / "a.png"
    out.write_bytes(b"precious")
    code, _, err = _sample(capsys, sd1_file, out)
    assert code == 1
    one_line(err, str(out), "already exists", "--overwrite")
    assert out.read_bytes() == b"precious"

    code, stdout, err = _sample(capsys, sd1_file, out, "--overwrite")
    assert code == 0, err
    assert stdout.split() == [str(out)] and out.read_bytes().startswith(b"\x89PNG")


def test_sample_checks_every_image_of_a_batch_before_sampling(capsys, tmp_path, sd1_file):
    out = tmp_path / "a.png"
    (tmp_path / "a_1.png").write_bytes(b"precious")
    code, _, err = _sample(capsys, sd1_file, out, "--batch", "2")
    assert code == 1
    one_line(err, str(tmp_path / "a_1.png"), "already exists")
    assert not (tmp_path / "a_0.png").exists()


@pytest.mark.parametrize("command", ["run", "demo"])
def test_an_empty_output_dir_is_refused(capsys, tmp_path, sd1_file, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    args = [write_json(tmp_path / "wf.json", sample_graph(sd1_file))] if command == "run" else []
    code, _, err = run_cli(capsys, command, *args, "--output-dir", "")
    assert code == 1
    one_line(err, "--output-dir", "empty")
    assert sorted(os.listdir(tmp_path)) == (["wf.json"] if command == "run" else [])


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


# --- file names that are not UTF-8 ----------------------------------------------------------------------------------
def test_a_non_utf8_broken_image_name_is_reported_and_training_runs(tmp_path, sd1, single_thread):
    from trainer_fixtures import make_concept, tiny_settings

    from comfyui_dreambooth.training.trainer import train

    concept = make_concept(tmp_path, n=2)
    bad = os.path.join(os.fsencode(concept.instance_dir), b"broken\xff\xfe.png")
    with open(bad, "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "out"
    result = train(sd1, [concept], tiny_settings(steps_per_image=1), output_root=str(out))
    report = open(os.path.join(result.run_dir, "dataset_report.txt"), encoding="utf-8").read()
    assert "broken\\xff\\xfe.png" in report


def test_a_failure_right_after_the_run_folder_is_made_leaves_no_empty_run(tmp_path, sd1, single_thread, monkeypatch):
    from trainer_fixtures import make_concept, tiny_settings

    from comfyui_dreambooth.training import runs
    from comfyui_dreambooth.training.trainer import train

    def no_lock(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs.RunFolder, "lock", no_lock)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space"):
        train(sd1, [make_concept(tmp_path, n=2)], tiny_settings(steps_per_image=1), output_root=str(out))
    assert runs.RunFolder.all_runs(str(out)) == []
    runs_root = out / runs.RUNS_SUBFOLDER
    assert not list(runs_root.glob("dreambooth-*")), "the new run folder is removed"
