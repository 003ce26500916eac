"""cli.py: info / convert / sample / run on tiny models the tests build, and one-line errors with exit codes."""
import json
import os
import subprocess
import sys
import types

import pytest

from comfyui_dreambooth import cli, runner
from comfyui_dreambooth.nodes import comfy_compat


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from comfyui_dreambooth.training.models import build_tiny_model, save_single_file

    path = tmp_path_factory.mktemp("models") / "tiny_sd1.safetensors"
    save_single_file(build_tiny_model("sd1", seed=0), str(path), dtype="fp32")
    return str(path)


# --- info / convert -------------------------------------------------------------------------------------------------
def test_info_prints_json(capsys, tiny_checkpoint):
    code, out, err = run_cli(capsys, "info", tiny_checkpoint)
    assert code == 0, err
    report = json.loads(out)
    assert report["family"] == "sd1" and report["prediction_type"] == "epsilon"
    assert set(report["parameters"]) >= {"unet", "vae", "text_encoder"}
    assert report["dtype"] == "float32"


def test_convert_single_file_to_diffusers_and_back(capsys, tmp_path, tiny_checkpoint):
    from safetensors import safe_open

    folder = tmp_path / "tiny_diffusers"
    code, out, err = run_cli(capsys, "convert", tiny_checkpoint, str(folder), "--dtype", "fp32")
    assert code == 0, err
    assert "diffusers folder" in out and (folder / "model_index.json").is_file()
    code, out, _ = run_cli(capsys, "info", str(folder))
    assert code == 0 and json.loads(out)["format"] == "diffusers"

    back = tmp_path / "back.safetensors"
    code, out, err = run_cli(capsys, "convert", str(folder), str(back), "--dtype", "fp32")
    assert code == 0, err
    with safe_open(tiny_checkpoint, "pt") as a, safe_open(str(back), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert a.get_tensor(key).equal(b.get_tensor(key)), key

    # refuses to overwrite unless asked; --dtype fp16 converts
    code, _, err = run_cli(capsys, "convert", str(folder), str(back))
    assert code == 1 and err.strip() == f"error: {back}: already exists; pass --overwrite to replace it"
    code, out, err = run_cli(capsys, "convert", str(folder), str(back), "--overwrite", "--dtype", "fp16")
    assert code == 0 and "fp16" in out, err
    with safe_open(str(back), "pt") as b:
        assert str(b.get_tensor(next(iter(b.keys()))).dtype) == "torch.float16"


def _dtypes_and_tensors(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_convert_is_lossless_by_default(capsys, tmp_path, tiny_checkpoint):
    """Without --dtype every tensor keeps its precision: fp32 stays fp32, bit for bit, both ways."""
    import glob

    folder = tmp_path / "kept"
    code, out, err = run_cli(capsys, "convert", tiny_checkpoint, str(folder))
    assert code == 0 and "dtypes kept" in out, err
    for weights in glob.glob(str(folder / "*" / "*.safetensors")):
        assert {str(t.dtype) for t in _dtypes_and_tensors(weights).values() if t.is_floating_point()} \
            == {"torch.float32"}, weights
    back = tmp_path / "kept.safetensors"
    code, _, err = run_cli(capsys, "convert", str(folder), str(back))
    assert code == 0, err
    source, result = _dtypes_and_tensors(tiny_checkpoint), _dtypes_and_tensors(str(back))
    assert set(source) == set(result)
    for key, tensor in source.items():
        assert result[key].dtype == tensor.dtype and result[key].equal(tensor), key

    # an fp16 file stays fp16 through a diffusers folder (not silently widened either)
    half = tmp_path / "half.safetensors"
    assert run_cli(capsys, "convert", tiny_checkpoint, str(half), "--dtype", "fp16")[0] == 0
    assert run_cli(capsys, "convert", str(half), str(tmp_path / "half_folder"))[0] == 0
    half_back = tmp_path / "half_back.safetensors"
    assert run_cli(capsys, "convert", str(tmp_path / "half_folder"), str(half_back))[0] == 0
    source, result = _dtypes_and_tensors(str(half)), _dtypes_and_tensors(str(half_back))
    assert {str(t.dtype) for t in result.values() if t.is_floating_point()} == {"torch.float16"}
    for key, tensor in source.items():
        assert result[key].dtype == tensor.dtype and result[key].equal(tensor), key


# --- sample ---------------------------------------------------------------------------------------------------------
def test_sample_writes_deterministic_pngs(capsys, tmp_path, tiny_checkpoint):
    from PIL import Image
    import numpy as np

    out = tmp_path / "img" / "dog.png"
    args = ["sample", tiny_checkpoint, "--prompt", "a photo of sks dog", "--out", str(out), "--steps", "2",
            "--width", "64", "--height", "64", "--seed", "5", "--scheduler", "ddim"]
    code, stdout, err = run_cli(capsys, *args, "--batch", "2")
    assert code == 0, err
    paths = [tmp_path / "img" / "dog_0.png", tmp_path / "img" / "dog_1.png"]
    assert stdout.split() == [str(p) for p in paths]
    first = Image.open(paths[0])
    assert first.size == (64, 64) and first.mode == "RGB"
    assert "Seed: 5" in first.text["parameters"] and "a photo of sks dog" in first.text["parameters"]
    assert "Seed: 6" in Image.open(paths[1]).text["parameters"]

    code, stdout, err = run_cli(capsys, *args)           # one image -> exactly --out
    assert code == 0, err
    assert stdout.split() == [str(out)]
    single = np.asarray(Image.open(out)).astype(int)
    # the same seed alone gives the same image; batched matmuls may round differently on CPU (by 1/255 at most)
    assert np.abs(single - np.asarray(first).astype(int)).max() <= 1
    out.unlink()
    code, _, err = run_cli(capsys, *args)                # same command, same pixels
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(out)).astype(int), single)


def test_sample_argument_errors(capsys, tmp_path, tiny_checkpoint):
    code, _, err = run_cli(capsys, "sample", tiny_checkpoint, "--prompt", "x", "--out", str(tmp_path / "a.gif"))
    assert code == 1 and "--out must end in .png" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "sample", tiny_checkpoint, "--prompt", "x", "--prompt", "y", "--batch", "2",
                           "--out", str(tmp_path / "a.png"))
    assert code == 1 and "--batch works with a single --prompt" in err
    code, _, err = run_cli(capsys, "sample", tiny_checkpoint, "--prompt", "x", "--scheduler", "heun",
                           "--out", str(tmp_path / "a.png"))
    assert code == 1 and "--scheduler 'heun': choose one of pndm" in err


def test_default_size_per_family():
    model = lambda family, pred="epsilon": types.SimpleNamespace(family=family, prediction_type=pred)
    assert cli.default_size(model("sd1")) == 512
    assert cli.default_size(model("sd2", "v_prediction")) == 768
    assert cli.default_size(model("sdxl")) == 1024
    assert cli.image_paths("a/b.png", 1) == ["a/b.png"]
    assert cli.image_paths("a/b.png", 2) == ["a/b_0.png", "a/b_1.png"]


# --- bad model files: one line naming the file ----------------------------------------------------------------------
def test_missing_model(capsys, tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    code, out, err = run_cli(capsys, "info", missing)
    assert code == 1 and out == ""
    assert err == f"error: {missing}: model not found\n"


def test_corrupt_and_non_sd_files(capsys, tmp_path):
    import torch
    from safetensors.torch import save_file

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": broken")
    code, _, err = run_cli(capsys, "info", str(corrupt))
    assert code == 1 and err.startswith(f"error: {corrupt}: ") and err.count("\n") == 1
    assert "unexpected" not in err

    other = tmp_path / "classifier.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, str(other))
    code, _, err = run_cli(capsys, "convert", str(other), str(tmp_path / "out_folder"))
    assert code == 1 and err.startswith(f"error: {other}: ") and err.count("\n") == 1
    assert "unexpected" not in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--debug", "info", str(tmp_path / "nope.ckpt"))
    assert code == 1 and "Traceback" in err and err.rstrip().endswith("model not found")


# --- run ----------------------------------------------------------------------------------------------------------------
class Echo:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hi"}), "times": ("INT", {"default": 1, "min": 1, "max": 5})}}
    RETURN_TYPES = ()
    FUNCTION = "go"
    OUTPUT_NODE = True
    CATEGORY = "DreamBooth/test"

    def go(self, text, times):
        name = "echo.txt"
        with open(os.path.join(comfy_compat.output_directory(), name), "w") as f:
            f.write(text * times)
        return {"ui": {"images": [{"filename": name, "subfolder": "", "type": "output"}]}}


@pytest.fixture
def echo_pack(monkeypatch):
    monkeypatch.setattr(runner, "pack_node_classes", lambda: {"Echo": Echo})
    monkeypatch.setattr(runner, "pack_display_names", lambda: {"Echo": "Echo text"})


def test_run_executes_with_overrides_and_output_dir(capsys, tmp_path, echo_pack):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"3": {"class_type": "Echo", "inputs": {"text": "a", "times": 1},
                                    "_meta": {"title": "Say"}}}))
    out_dir = tmp_path / "outdir"
    code, out, err = run_cli(capsys, "run", str(wf), "--set", "Say.text=ab", "--set", "3.times=2",
                             "--output-dir", str(out_dir))
    assert code == 0, err
    assert (out_dir / "echo.txt").read_text() == "abab"
    assert str(out_dir / "echo.txt") in out.splitlines()
    assert "[1/1] node 3 'Say' (Echo)" in err

    code, out, err = run_cli(capsys, "run", str(wf), "--output-dir", str(out_dir), "--json", "--quiet")
    assert code == 0 and err == ""
    assert json.loads(out)["executed"] == ["3"]


class LoudEcho(Echo):
    def go(self, text, times):
        comfy_compat.log("scanning images")           # the pack's own lines, as the data node prints them
        print("a node's own print")
        return super().go(text, times)


@pytest.mark.parametrize("quiet", [True, False])
def test_run_json_keeps_stdout_for_the_json_alone(capsys, tmp_path, monkeypatch, quiet):
    """Issue 24.9: `run --json --quiet` put "[DreamBooth] scanning images" before the JSON on stdout."""
    monkeypatch.setattr(runner, "pack_node_classes", lambda: {"Echo": LoudEcho})
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"3": {"class_type": "Echo", "inputs": {"text": "a", "times": 1}}}))
    code, out, err = run_cli(capsys, "run", str(wf), "--output-dir", str(tmp_path / "o"), "--json",
                             *(["--quiet"] if quiet else []))
    assert code == 0, err
    assert json.loads(out)["executed"] == ["3"]               # stdout is the JSON and nothing else
    assert "[DreamBooth] scanning images" in err and "a node's own print" in err
    code, out, err = run_cli(capsys, "run", str(wf), "--output-dir", str(tmp_path / "o"), "--quiet")
    assert code == 0 and "[DreamBooth] scanning images" in out     # without --json: as before


def test_run_errors_are_one_line(capsys, tmp_path, echo_pack):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"3": {"class_type": "Echo", "inputs": {"text": "a", "times": 9}},
                              "4": {"class_type": "CheckpointLoaderSimple", "inputs": {}}}))
    code, _, err = run_cli(capsys, "run", str(wf), "--output-dir", str(tmp_path / "o"))
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: {wf}: this graph uses ComfyUI core nodes") and "CheckpointLoaderSimple (node 4)" in err

    wf.write_text(json.dumps({"3": {"class_type": "Echo", "inputs": {"text": "a", "times": 9}}}))
    code, _, err = run_cli(capsys, "run", str(wf), "--output-dir", str(tmp_path / "o"))
    assert code == 1
    assert err == f"error: {wf}: 1 validation error: node 3 (Echo) input 'times': value 9 is bigger than the maximum 5\n"

    code, _, err = run_cli(capsys, "run", str(wf), "--set", "Nobody.x=1")
    assert code == 1 and err.startswith(f"error: {wf}: --set 'Nobody.x=1': no node with id or title 'Nobody'")

    code, _, err = run_cli(capsys, "run", str(tmp_path / "missing.json"))
    assert err == f"error: {tmp_path / 'missing.json'}: workflow file not found\n"


# --- the program itself -----------------------------------------------------------------------------------------------
def test_subcommands_come_from_a_table(capsys):
    assert {"info", "convert", "sample", "run"} <= set(cli.COMMANDS)
    try:
        @cli.command("hello", "say hello", arguments=lambda p: p.add_argument("--name", default="you"))
        def hello(args):
            print(f"hello {args.name}")
            return 3
        code, out, _ = run_cli(capsys, "hello", "--name", "db")
        assert code == 3 and out == "hello db\n"
    finally:
        cli.COMMANDS.pop("hello", None)


@pytest.mark.parametrize("program", [[sys.executable, "-m", "comfyui_dreambooth"],
                                     [os.path.join(os.path.dirname(sys.executable), "comfyui-dreambooth")]])
@pytest.mark.slow
def test_module_and_console_script_are_the_same_program(tmp_path, program):
    if not os.path.exists(program[0]):
        pytest.skip("console script not installed in this environment")
    missing = str(tmp_path / "x.safetensors")
    done = subprocess.run(program + ["info", missing], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr == f"error: {missing}: model not found\n" and done.stdout == ""
    usage = subprocess.run(program + ["--help"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: comfyui-dreambooth")
