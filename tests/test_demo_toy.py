"""`comfyui-dreambooth demo` (the default): the shipped toy example headless on the toy base, then base vs trained
measured by the toy world's evaluator, a base | trained grid and a loss plot (one real run shared by the tests)."""
import contextlib
import io
import os
import re

import pytest
from PIL import Image

from comfyui_dreambooth import cli, demo


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toydemo") / "out"
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        rc = cli.main(["demo", "--output-dir", str(out), "--quiet"])
    return {"out": out, "rc": rc, "stdout": printed.getvalue(), "stderr": errors.getvalue()}


def figures(stdout: str, label: str) -> tuple[float, float]:
    m = re.search(rf"^  {label}\s+([0-9.]+)\s+([0-9.]+)", stdout, re.M)
    assert m, f"no '{label}' figures in:\n{stdout}"
    return float(m.group(1)), float(m.group(2))


@pytest.mark.slow
def test_toy_demo_teaches_the_base_the_subject(toy_run):
    """The demo's point: the untrained base never draws the subject, the trained model does (evaluator's reading)."""
    assert toy_run["rc"] == 0, toy_run["stdout"] + toy_run["stderr"][-3000:]
    before, after = figures(toy_run["stdout"], "subject fidelity")
    assert before == 0.0 and after >= 0.5, toy_run["stdout"]
    pres_before, pres_after = figures(toy_run["stdout"], "PRES")
    assert 0.0 <= pres_before <= 1.0 and 0.0 <= pres_after <= 1.0


@pytest.mark.slow
def test_toy_demo_prints_and_writes_its_files(toy_run):
    stdout, out = toy_run["stdout"], str(toy_run["out"])
    for label in ("concept images", "run folder", "trained model", "grid", "loss plot"):
        paths = [m.group(1) for m in re.finditer(rf"^  {label}\s+(\S+)", stdout, re.M)]
        assert paths and all(p.startswith(out) and os.path.exists(p) for p in paths), (label, stdout)
    assert len(os.listdir(os.path.join(out, "input", "toyworld", demo.TOY_SUBJECT))) >= 5
    grid = Image.open(os.path.join(out, demo.TOY_GRID))
    assert grid.size[0] == 2 * demo.TOY_GRID_SAMPLES * 64 + 12        # base | trained, side by side
    assert grid.size[1] > len(demo.TOY_PROMPTS) * 64


def test_toy_overrides_target_the_toy_example():
    """Every override names a node title and input of the shipped toy example (checked by the runner)."""
    from comfyui_dreambooth import runner

    prepared = runner.prepare_workflow(demo.example_workflow_path(demo.TOY_WORKFLOW),
                                       overrides=demo.toy_overrides("/tmp/subject"))
    titles = {n["_meta"]["title"]: n["inputs"] for n in prepared.prompt.values()}
    assert titles["Concept"]["instance_dir"] == "/tmp/subject"
    assert titles["Settings"]["run_name"] == "demo_toy"
    assert all(t["filename_prefix"].startswith("demo/") for name, t in titles.items() if "filename_prefix" in t)
