"""Quiet runs (issue 9): a normal CLI run prints the pack's own lines only — no library notices (transformers'
"image processor ... requires torchvision"), no FutureWarnings, no diffusers/transformers tqdm bars — and the
problem files of the data, one line each; `--debug` leaves the libraries as verbose as they are.

The commands run in a fresh interpreter, as a user runs them, with none of the verbosity settings conftest makes
for the test process itself."""
import json
import os
import subprocess
import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from comfyui_dreambooth import demo

# what leaked before: transformers' import-time notices, the FutureWarning of gradient_checkpointing_enable, and
# tqdm bars ("Loading weights: 100%|██████████| 36/36 [00:00<00:00, 17728.65it/s]")
NOISE = ("FutureWarning", "DeprecationWarning", "it/s]", "s/it]", "|█", "image processor", "ImageProcessor",
         "torchvision", "warnings.warn", "Loading weights", "Loading pipeline")


def quiet_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "PYTHONWARNINGS", "TQDM_DISABLE",
                        "HF_HUB_DISABLE_PROGRESS_BARS", "COMFYUI_DREAMBOOTH_DEBUG")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def cli(*argv, timeout=600):
    done = subprocess.run([sys.executable, "-m", "comfyui_dreambooth", *argv], capture_output=True, text=True,
                          env=quiet_env(), timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(demo.__file__))))
    return done.returncode, done.stdout, done.stderr


def noise_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(n in line for n in NOISE)]


def transformers_draws_load_bars() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The module's CLI commands, each run once, two at a time (each is a fresh interpreter doing mostly imports and
    tiny-model work on one thread, so two side by side take about the time of one): `convert` and then the two
    commands that sample its diffusers folder in one chain, the training `run` and then the single-file `sample`
    in the other. Each test waits for its own command only and checks that one's output.

    "done": name -> Future of (returncode, stdout, stderr); "out_png": layout -> the image its sample writes."""
    root = tmp_path_factory.mktemp("quiet")
    single = demo.make_tiny_checkpoint(str(root / "checkpoints" / demo.CHECKPOINT_NAME))
    diffusers = str(root / "tiny_diffusers")
    pngs = {name: str(tmp_path_factory.mktemp(name) / "s.png") for name in ("single", "diffusers", "debug")}

    # the run's concept folder: its images plus a broken image, a duplicate and a stray file
    concept = root / "input" / "concept"
    images = demo.make_concept_images(str(concept))
    (concept / "broken.png").write_text("not an image")
    (concept / "copy.png").write_bytes(open(images[0], "rb").read())
    (concept / "notes.md").write_text("x")
    run_argv = ["run", demo.example_workflow_path(), "--output-dir", str(root)]
    for o in demo.demo_overrides(demo.CHECKPOINT_NAME, str(concept), epochs=1):
        run_argv += ["--set", o]

    def sample(model, out_png):
        return cli("sample", model, "--prompt", "a photo of sks toy", "--out", out_png, "--steps", "2",
                   "--width", "64", "--height", "64")

    def debug_sample():
        return cli("--debug", "sample", diffusers, "--prompt", "a photo", "--out", pngs["debug"], "--steps", "1",
                   "--width", "64", "--height", "64")

    done = {name: Future() for name in ("convert", "sample diffusers", "debug sample", "run", "sample single")}

    def after_convert(job):
        def run():
            code, out, err = done["convert"].result()
            if code != 0:                              # nothing to sample: the convert failure is the answer
                return code, "convert failed:\n" + out, err
            return job()
        return run

    def chain(*steps):
        for name, job in steps:
            try:
                done[name].set_result(job())
            except BaseException as exc:               # a timeout, say: the test of that command reports it
                done[name].set_exception(exc)

    diffusers_steps = [("convert", lambda: cli("convert", single, diffusers)),
                       ("sample diffusers", after_convert(lambda: sample(diffusers, pngs["diffusers"])))]
    if transformers_draws_load_bars():                 # else test_debug_run_keeps_the_library_output skips
        diffusers_steps.append(("debug sample", after_convert(debug_sample)))
    with ThreadPoolExecutor(max_workers=2) as pool:
        pool.submit(chain, *diffusers_steps)
        pool.submit(chain, ("run", lambda: cli(*run_argv)), ("sample single", lambda: sample(single, pngs["single"])))
        yield {"done": done, "out_png": pngs, "concept": concept}


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["single", "diffusers"])
def test_sample_prints_only_its_own_lines(runs, layout):
    out_png = runs["out_png"][layout]
    code, out, err = runs["done"][f"sample {layout}"].result()
    assert code == 0, out + err
    assert out.splitlines() == [str(out_png)], out + err
    assert not noise_in(out + err), "\n".join(noise_in(out + err))
    assert all(line.startswith("sampling |") for line in err.replace("\r", "\n").splitlines() if line.strip()), err


@pytest.mark.slow
def test_debug_run_keeps_the_library_output(runs):
    if not transformers_draws_load_bars():
        pytest.skip("transformers 4 draws no bar while loading a text encoder")
    code, out, err = runs["done"]["debug sample"].result()
    assert code == 0 and "Loading weights" in err, out + err


@pytest.mark.slow
def test_run_prints_the_pack_lines_and_each_problem_file_but_no_library_noise(runs):
    """A real training run through `comfyui-dreambooth run` (the demo's graph: class images, text encoder
    training with gradient checkpointing, sampling, saving): clean output; the broken image, the duplicate and
    the stray file in the concept folder are named on the console."""
    concept = runs["concept"]
    code, out, err = runs["done"]["run"].result()
    assert code == 0, out + err
    assert not noise_in(out + err), "\n".join(noise_in(out + err))
    lines = out.splitlines()
    for kind, name in (("BAD", "broken.png"), ("DUPLICATE", "copy.png"), ("IGNORED", "notes.md")):
        path = str(concept / name)
        assert any(line.startswith("[DreamBooth] concept 1: ") and kind in line and path in line for line in lines), \
            (kind, out)
    assert "training" in out and "ran 7 node(s)" in out


def test_debug_leaves_the_libraries_verbose(monkeypatch):
    """--debug (or COMFYUI_DREAMBOOTH_DEBUG=1 inside ComfyUI) switches the silencing off."""
    from transformers.utils import logging as tlog

    from comfyui_dreambooth.training import quiet

    monkeypatch.setattr(quiet, "_verbose", True)
    level = tlog.get_verbosity()
    with quiet.quiet_libraries():
        assert tlog.get_verbosity() == level
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            warnings.warn("x", FutureWarning)
        assert caught


def test_quiet_libraries_is_scoped_and_restores_everything():
    """The silencing covers the pack's calls only: after them, the user's other nodes see the libraries as they
    were (verbosity, progress bars, warning filters)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from comfyui_dreambooth.training import quiet

    before = (tlog.get_verbosity(), dlog.get_verbosity(), tlog.is_progress_bar_enabled(),
              dlog.is_progress_bar_enabled(), list(warnings.filters))
    with quiet.quiet_libraries():
        assert tlog.get_verbosity() >= tlog.ERROR and dlog.get_verbosity() >= dlog.ERROR
        assert not tlog.is_progress_bar_enabled() and not dlog.is_progress_bar_enabled()
        with quiet.quiet_libraries():                      # nested (a node calling the backend): no change
            assert not tlog.is_progress_bar_enabled()
        assert not dlog.is_progress_bar_enabled()
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("library", FutureWarning)        # catch_warnings(record) keeps the filters in force
        assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    after = (tlog.get_verbosity(), dlog.get_verbosity(), tlog.is_progress_bar_enabled(),
             dlog.is_progress_bar_enabled(), list(warnings.filters))
    assert after == before


def test_every_node_function_runs_quietly():
    from comfyui_dreambooth.nodes import NODE_CLASS_MAPPINGS

    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert getattr(getattr(cls, cls.FUNCTION), "quiet_libraries", False), name


def test_quiet_module_is_cheap_to_import():
    code = ("import sys; import comfyui_dreambooth.training.quiet; "
            "print(json.dumps(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules))))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == []


def test_pipelines_are_built_bare_and_silent(sd1):
    """Sampling (SampleTrained, previews, class images) builds its pipeline without feature extractor, image
    encoder or safety checker, with its progress bar off, whoever calls it."""
    from comfyui_dreambooth.training.sampling import build_pipeline

    pipe = build_pipeline(sd1)
    assert pipe.feature_extractor is None and pipe.safety_checker is None and pipe.image_encoder is None
    assert pipe._progress_bar_config == {"disable": True}
