"""bench/run.py's cheap parts: arguments, the torchvision stand-in, the table, the skip note (no training runs)."""
import importlib.util
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _load(name, path, package_dir=None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[package_dir] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run():
    return _load("bench_run", os.path.join(BENCH, "run.py"))


@pytest.fixture(scope="module")
def workload(run):
    """bench/workload.py as run.py imported it (run.py puts bench/ on sys.path)."""
    return sys.modules["workload"]


@pytest.fixture(scope="module")
def diffusers_ref(run):
    return sys.modules["diffusers_ref"]


@pytest.fixture(scope="module")
def standin():
    """The stand-in loaded under another name: a `torchvision` in this process would change what transformers
    imports for every later test."""
    folder = os.path.join(BENCH, "_torchvision_standin", "torchvision")
    return _load("_bench_torchvision_standin", os.path.join(folder, "__init__.py"), folder)


def test_arguments(run):
    a = run.parse_args([])
    assert (a.device, a.steps, a.models, a.modes, a.threads) == ("cpu", 100, ["tiny", "small"], ["lora", "full"], 1)
    assert a.parts == ["step", "e2e", "diffusers"]
    q = run.parse_args(["--quick", "--diffusers-examples", "/x"])
    assert (q.steps, q.models, q.diffusers_examples) == (30, ["tiny"], "/x")
    assert run.parse_args(["--flops"]).parts[-1] == "mfu"
    g = run.parse_args(["--device", "cuda"])
    assert (g.models, g.threads, "mfu" in g.parts) == (["sd15"], 0, True)
    assert run.parse_args(["--parts", "e2e", "--modes", "lora", "--steps", "7"]).parts == ["e2e"]
    for bad in (["--modes", "dora"], ["--parts", "speed"], ["--models", "sd15"],
                ["--diffusers-examples", "a", "--diffusers-git", "b"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad)


def test_standin_transforms(standin):
    from PIL import Image

    t = standin.transforms
    image = Image.new("RGB", (100, 80), (255, 0, 128))
    assert t.Resize(64)(image).size == (80, 64)              # shorter side to 64, aspect kept
    pipeline = t.Compose([t.Resize(64, interpolation=t.InterpolationMode.LANCZOS), t.RandomCrop(64), t.ToTensor(),
                          t.Normalize([0.5], [0.5])])
    x = pipeline(image)
    assert tuple(x.shape) == (3, 64, 64) and str(x.dtype) == "torch.float32"
    assert x[0].min().item() == pytest.approx(1.0) and x[1].max().item() == pytest.approx(-1.0)
    assert -1.0 <= x.min().item() and x.max().item() <= 1.0
    y = t.Compose([t.Resize(64, interpolation=t.InterpolationMode.BILINEAR), t.CenterCrop(64), t.ToTensor()])(image)
    assert tuple(y.shape) == (3, 64, 64) and 0.0 <= y.min().item() and y.max().item() <= 1.0
    assert tuple(t.ToTensor()(Image.new("L", (5, 7))).shape) == (1, 7, 5)
    assert tuple(t.functional.pil_to_tensor(image).shape) == (3, 80, 100)
    # train_dreambooth_lora.py builds its --image_interpolation_mode choices this way
    modes = [f.lower() for f in dir(t.InterpolationMode) if not f.startswith("__") and not f.endswith("__")]
    assert {"lanczos", "bilinear", "bicubic", "nearest"} <= set(modes)


def test_table_and_verdicts(run, workload, diffusers_ref):
    text = run.format_table(["model", "ms", "ratio"], [["tiny", 12.5, 1.0312], ["small", None, 0.5]], "title")
    lines = text.splitlines()
    assert lines[0] == "title" and lines[1].split() == ["model", "ms", "ratio"]
    assert set(lines[2]) == {"-"} and len(lines[2]) == max(len(ln) for ln in lines[1:])
    assert lines[3].split() == ["tiny", "12.5", "1.031"] and lines[4].split() == ["small", "-", "0.500"]
    assert lines[3].index("12.5") + 4 == lines[4].index("-") + 1         # numbers right-aligned
    assert run.verdict(1.04, 1.05, at_most=True) == "ok" and run.verdict(1.2, 1.5, at_most=False) == "MISSED"
    assert run.verdict(None, 1.5, at_most=False) == "n/a"
    assert workload.peak_tflops("NVIDIA H200") == 989.0 and workload.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert workload.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and workload.peak_tflops("cpu") is None
    assert diffusers_ref.nearest_tag(["v0.39.0", "v0.40.0", "v0.41.0rc1", "nightly"], "0.42.1") == "v0.40.0"
    assert diffusers_ref.nearest_tag(["v0.39.0", "v0.40.0"], "0.39.0") == "v0.39.0"
    bar = "Steps:  97%|#| 29/30 [00:13<00:00, 2.2it/s]\rSteps: 100%|#| 30/30 [01:14<00:00, 2.25it/s, loss=1.1]"
    assert diffusers_ref.tqdm_elapsed(bar, 30) == 74 and diffusers_ref.tqdm_elapsed(bar, 100) is None


def test_skip_note_without_diffusers_examples(run, diffusers_ref, tmp_path, capsys):
    scripts, note = diffusers_ref.diffusers_scripts(None)
    assert scripts is None and "skipped" in note
    assert "no such folder" in diffusers_ref.diffusers_scripts(str(tmp_path / "nope"))[1]
    (tmp_path / "train_dreambooth.py").write_text("")
    assert "train_dreambooth_lora.py" in diffusers_ref.diffusers_scripts(str(tmp_path))[1]
    (tmp_path / "train_dreambooth_lora.py").write_text("")
    scripts, note = diffusers_ref.diffusers_scripts(str(tmp_path))
    assert note is None and scripts["lora"].endswith("train_dreambooth_lora.py")
    table = run.e2e_table([{"model": "tiny", "mode": "lora", "resolution": 64, "steps": 30,
                            "ours": {"wall_s": 12.0, "phases": {"to_first_step_s": 8.0, "training_s": 3.5}}}],
                          "diffusers comparison skipped: no --diffusers-examples DIR")
    assert "skipped" in table.splitlines()[-1] and "12.0" in table

    # the whole command with only the diffusers part and no DIR: nothing runs, the note is printed and recorded
    out = tmp_path / "r.json"
    assert run.main(["--parts", "diffusers", "--json", str(out), "--log-dir", str(tmp_path / "logs")]) == 0
    assert "diffusers comparison skipped" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert "skipped" in result["diffusers"] and result["machine"]["cpu_count"] == os.cpu_count()
    assert result["machine"]["device"] == "cpu" and result["machine"]["torch"]
