"""Issue 10: inside a ComfyUI server others can reach, node inputs that are paths stay inside ComfyUI's folders and
the folders the user allowed; environment variables are never expanded; reports do not list whole folders.

ComfyUI is faked the way tests/test_node_train.py does it (folder_paths, comfy.*, server in sys.modules), plus
comfy.cli_args.args.listen, the address the server listens on.
"""
import json
import os
import sys
import types

import pytest
from PIL import Image

from comfyui_dreambooth.nodes import comfy_compat, paths
from comfyui_dreambooth.nodes.concepts import ConceptDataset
from comfyui_dreambooth.nodes.models import LoadBaseModel, resolve_model_path, save_images
from comfyui_dreambooth.training import access
from comfyui_dreambooth.training.access import ALLOWED_DIRS_ENV, PathNotAllowedError

WIDGETS = dict(instance_prompt="[filewords]", instance_token="sks", class_dir="", class_prompt="photo of a dog",
               class_token="dog", class_negative_prompt="", num_class_images_per_image=0,
               class_guidance_scale=7.5, class_steps=30, sample_prompt="", concept_type="person", repeats=1,
               prior_loss_weight=1.0)


def images(folder, n=2):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(os.path.join(folder, f"{i:02d}.png"))
    return str(folder)


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """A fake ComfyUI rooted at tmp_path/ComfyUI listening on 0.0.0.0; `.listen(...)` changes the address."""
    base = tmp_path / "ComfyUI"
    for sub in ("input", "output", "temp", "models/checkpoints", "models/loras", "models/diffusers"):
        (base / sub).mkdir(parents=True)
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_output_directory = lambda: str(base / "output")
    folder_paths.get_input_directory = lambda: str(base / "input")
    folder_paths.get_temp_directory = lambda: str(base / "temp")
    folder_paths.models_dir = str(base / "models")
    folder_paths.get_folder_paths = lambda kind: [str(base / "models" / kind)]
    folder_paths.get_filename_list = lambda kind: []
    folder_paths.get_full_path = lambda kind, name: None
    comfy_mod = types.ModuleType("comfy")
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = types.SimpleNamespace(listen="0.0.0.0,::")
    comfy_mod.cli_args = cli_args
    for name, module in {"folder_paths": folder_paths, "comfy": comfy_mod, "comfy.cli_args": cli_args}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv(ALLOWED_DIRS_ENV, raising=False)
    monkeypatch.setattr(access, "PACK_ROOT", str(tmp_path / "pack"))      # no config file beside the pack
    (tmp_path / "pack").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()

    def listen(value):
        cli_args.args.listen = value
    return types.SimpleNamespace(base=base, input=base / "input", output=base / "output", outside=outside,
                                 pack=tmp_path / "pack", listen=listen, cli_args=cli_args)


# --- the rule ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("listen,loopback", [
    ("127.0.0.1", True), ("127.2.2.2,127.3.3.3", True), ("::1", True), ("localhost", True), ("[::1]", True),
    ("0.0.0.0,::", False), ("0.0.0.0", False), ("192.168.1.20", False), ("127.0.0.1,0.0.0.0", False),
    ("myhost.example", False), ("", False), (None, False)])
def test_loopback_addresses(listen, loopback):
    assert access.is_loopback(listen) is loopback


def test_allowed_dirs_from_env_json_and_txt(tmp_path):
    env = {ALLOWED_DIRS_ENV: os.pathsep.join(["/data/a", "", "/data/b/"])}
    assert access.read_allowed_dirs(env, str(tmp_path)).folders == ["/data/a", "/data/b"]
    (tmp_path / "dreambooth_paths.json").write_text(json.dumps({"allowed_dirs": ["/srv/x"],
                                                                "allow_all_on_loopback": False}))
    allowed = access.read_allowed_dirs(env, str(tmp_path))
    assert allowed.folders == ["/data/a", "/data/b", "/srv/x"] and allowed.allow_all_on_loopback is False
    os.remove(tmp_path / "dreambooth_paths.json")
    (tmp_path / "dreambooth_paths.txt").write_text("# datasets\n/srv/y  # the big disk\n\n")
    assert access.read_allowed_dirs({}, str(tmp_path)).folders == ["/srv/y"]


@pytest.mark.parametrize("name,text,says", [
    ("dreambooth_paths.json", "{not json", "not valid JSON"),
    ("dreambooth_paths.json", '{"allowed_dirs": ["relative/dir"]}', "not an absolute folder"),
    ("dreambooth_paths.json", '{"alowed_dirs": []}', "unknown key(s) alowed_dirs"),
    ("dreambooth_paths.txt", "data\n", "not an absolute folder")])
def test_a_bad_config_is_one_line_naming_the_file(tmp_path, name, text, says):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as e:
        access.read_allowed_dirs({}, str(tmp_path))
    assert str(tmp_path / name) in str(e.value) and says in str(e.value) and "\n" not in str(e.value)


def test_relative_env_entry_is_refused():
    with pytest.raises(ValueError, match=ALLOWED_DIRS_ENV):
        access.read_allowed_dirs({ALLOWED_DIRS_ENV: "datasets"}, "/nonexistent")


# --- ConceptDataset --------------------------------------------------------------------------------------------------
def test_instance_dir_outside_is_refused_on_a_reachable_server(comfy):
    folder = images(comfy.outside / "dog")
    with pytest.raises(PathNotAllowedError) as e:
        ConceptDataset().build(instance_dir=folder, **WIDGETS)
    message = str(e.value)
    assert "ConceptDataset instance_dir" in message and folder in message
    assert ALLOWED_DIRS_ENV in message and "dreambooth_paths" in message and "0.0.0.0" in message
    assert "\n" not in message


def test_refused_paths_reveal_nothing_about_them(comfy):
    """Not even whether they exist: the same error for a real and a missing folder; IS_CHANGED lists nothing."""
    images(comfy.outside / "dog")
    messages = []
    for name in ("dog", "missing"):
        with pytest.raises(PathNotAllowedError) as e:
            ConceptDataset().build(instance_dir=str(comfy.outside / name), **WIDGETS)
        messages.append(str(e.value).replace(name, "X"))
    assert messages[0] == messages[1]
    images(comfy.outside / "dog", 3)                       # contents of a refused folder are not looked at
    before = ConceptDataset.IS_CHANGED(instance_dir=str(comfy.outside / "dog"), class_dir="")
    images(comfy.outside / "dog", 5)
    assert ConceptDataset.IS_CHANGED(instance_dir=str(comfy.outside / "dog"), class_dir="") == before


def test_input_folder_and_subfolders_are_allowed(comfy):
    images(comfy.input / "people" / "alice")
    out = ConceptDataset().build(instance_dir="people/alice", **WIDGETS)
    assert out["result"][0][0].instance_dir == str(comfy.input / "people" / "alice")
    out = ConceptDataset().build(instance_dir=str(comfy.input / "people" / "alice"), **WIDGETS)
    assert "instance images: 2" in out["result"][1]


def test_climbing_out_of_the_input_folder_is_refused(comfy):
    images(comfy.outside / "dog")
    with pytest.raises(PathNotAllowedError, match="instance_dir"):
        ConceptDataset().build(instance_dir="../../outside/dog", **WIDGETS)


def test_symlink_from_input_to_outside_is_refused(comfy):
    """Containment is decided on the real path: a link inside input/ does not open what it points to."""
    images(comfy.outside / "dog")
    os.symlink(comfy.outside / "dog", comfy.input / "dog")
    with pytest.raises(PathNotAllowedError) as e:
        ConceptDataset().build(instance_dir="dog", **WIDGETS)
    assert "a link to" in str(e.value) and str(comfy.outside / "dog") in str(e.value)


def test_allowed_dirs_open_a_folder(comfy, monkeypatch):
    folder = images(comfy.outside / "dog")
    monkeypatch.setenv(ALLOWED_DIRS_ENV, str(comfy.outside))
    assert ConceptDataset().build(instance_dir=folder, **WIDGETS)["result"][0][0].instance_dir == folder
    monkeypatch.delenv(ALLOWED_DIRS_ENV)
    (comfy.pack / "dreambooth_paths.txt").write_text(f"{comfy.outside}\n")
    assert ConceptDataset().build(instance_dir=folder, **WIDGETS)["result"][0][0].instance_dir == folder


def test_class_dir_outside_is_refused_when_class_images_are_used(comfy):
    images(comfy.input / "dog")
    widgets = {**WIDGETS, "num_class_images_per_image": 2, "class_dir": str(comfy.outside / "classes")}
    with pytest.raises(PathNotAllowedError, match="ConceptDataset class_dir.*write to"):
        ConceptDataset().build(instance_dir="dog", **widgets)
    widgets["class_dir"] = ""                             # the default lands in the output folder: allowed
    concept = ConceptDataset().build(instance_dir="dog", **widgets)["result"][0][0]
    assert concept.class_dir.startswith(str(comfy.output))


def test_mask_dir_outside_is_refused_and_a_relative_one_is_found_in_input(comfy):
    """Masked loss (issue 20.3): mask_dir is a folder input like instance_dir; IS_CHANGED does not list it either."""
    images(comfy.input / "dog")
    images(comfy.outside / "masks")
    with pytest.raises(PathNotAllowedError, match="ConceptDataset mask_dir"):
        ConceptDataset().build(instance_dir="dog", **{**WIDGETS, "mask_dir": str(comfy.outside / "masks")})
    before = ConceptDataset.IS_CHANGED(instance_dir="dog", class_dir="", mask_dir=str(comfy.outside / "masks"))
    images(comfy.outside / "masks", 4)
    assert ConceptDataset.IS_CHANGED(instance_dir="dog", class_dir="", mask_dir=str(comfy.outside / "masks")) == before
    images(comfy.input / "dog_masks")
    out = ConceptDataset().build(instance_dir="dog", **{**WIDGETS, "mask_dir": "dog_masks"})
    assert out["result"][0][0].mask_dir == str(comfy.input / "dog_masks")
    assert "masks: 2 of 2 instance images (2 from mask_dir)" in out["result"][1]


def test_loopback_server_allows_any_folder(comfy):
    folder = images(comfy.outside / "dog")
    comfy.listen("127.0.0.1")
    assert ConceptDataset().build(instance_dir=folder, **WIDGETS)["result"][0][0].instance_dir == folder
    (comfy.pack / "dreambooth_paths.json").write_text('{"allow_all_on_loopback": false}')
    with pytest.raises(PathNotAllowedError, match="allow_all_on_loopback"):
        ConceptDataset().build(instance_dir=folder, **WIDGETS)


def test_unknown_listen_address_is_treated_as_reachable(comfy):
    folder = images(comfy.outside / "dog")
    del comfy.cli_args.args.listen
    with pytest.raises(PathNotAllowedError, match="unknown"):
        ConceptDataset().build(instance_dir=folder, **WIDGETS)


def test_headless_accepts_any_path(tmp_path):
    folder = images(tmp_path / "anywhere" / "dog")
    assert not comfy_compat.in_comfyui()
    assert ConceptDataset().build(instance_dir=folder, **WIDGETS)["result"][0][0].instance_dir == folder


# --- environment variables are never expanded ---------------------------------------------------------------------------
SECRET = "sk-test-0123456789-secret"


@pytest.mark.parametrize("typed", ["/tmp/${DB_TEST_SECRET}", "/tmp/$DB_TEST_SECRET/x", "%DB_TEST_SECRET%"])
def test_environment_variables_are_never_expanded_headless(monkeypatch, typed):
    monkeypatch.setenv("DB_TEST_SECRET", SECRET)
    with pytest.raises(Exception) as e:
        ConceptDataset().build(instance_dir=typed, **WIDGETS)
    assert SECRET not in str(e.value)
    with pytest.raises(Exception) as e:
        resolve_model_path("(use model_path)", typed)
    assert SECRET not in str(e.value)


def test_environment_variables_are_never_expanded_in_comfyui(comfy, monkeypatch):
    monkeypatch.setenv("DB_TEST_SECRET", SECRET)
    for typed in ("/tmp/${DB_TEST_SECRET}", "${DB_TEST_SECRET}"):
        with pytest.raises(Exception) as e:
            ConceptDataset().build(instance_dir=typed, **WIDGETS)
        assert SECRET not in str(e.value)


def test_home_folder_is_not_expanded_inside_comfyui(comfy, monkeypatch):
    """`~` comes from $HOME: inside ComfyUI it is a plain name (here: a folder in input/)."""
    monkeypatch.setenv("HOME", str(comfy.outside))
    images(comfy.outside / "dog")
    images(comfy.input / "~" / "dog")
    assert paths.typed_path("~/dog") == "~/dog"
    concept = ConceptDataset().build(instance_dir="~/dog", **WIDGETS)["result"][0][0]
    assert concept.instance_dir == str(comfy.input / "~" / "dog")


def test_home_folder_is_expanded_headless(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.typed_path(" '~/dog' ") == str(tmp_path / "dog")


# --- LoadBaseModel -----------------------------------------------------------------------------------------------------
def test_model_path_outside_is_refused(comfy):
    model = comfy.outside / "m.safetensors"
    model.write_bytes(b"x" * 100)
    with pytest.raises(PathNotAllowedError, match="LoadBaseModel model_path"):
        resolve_model_path("(use model_path)", str(model))
    with pytest.raises(PathNotAllowedError):
        LoadBaseModel().load("(use model_path)", model_path=str(model))
    assert LoadBaseModel.IS_CHANGED("(use model_path)", model_path=str(model)) == ""     # not hashed
    inside = comfy.base / "models" / "checkpoints" / "m.safetensors"
    inside.write_bytes(b"x")
    assert resolve_model_path("(use model_path)", str(inside)) == str(inside)


# --- TrainDreamBooth resume -----------------------------------------------------------------------------------------------
def test_resume_folder_outside_is_refused_before_anything_runs(comfy):
    from comfyui_dreambooth.nodes.train import TrainDreamBooth, resume_setting

    assert resume_setting("auto") == "auto" and resume_setting(" new ") == "new" and resume_setting("") == "auto"
    run = comfy.outside / "run"
    run.mkdir()
    with pytest.raises(PathNotAllowedError, match="TrainDreamBooth resume"):
        TrainDreamBooth().train(object(), [], object(), resume=str(run))
    inside = comfy.output / "dreambooth" / "run-1"
    inside.mkdir(parents=True)
    assert resume_setting("dreambooth/run-1") == str(inside)


# --- SampleTrained filename_prefix ------------------------------------------------------------------------------------------
def test_sample_prefix_through_a_symlinked_subfolder_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    outside = tmp_path / "outside"
    outside.mkdir()
    with comfy_compat.using_output_directory(tmp_path / "out"):
        (tmp_path / "out").mkdir()
        os.symlink(outside, tmp_path / "out" / "escape")
        batch = torch.zeros(1, 8, 8, 3)
        with pytest.raises(ValueError, match="SampleTrained filename_prefix"):
            save_images(batch, "escape/sample")
        assert os.listdir(outside) == []
        ok = save_images(batch, "dreambooth/sample")
        assert ok[0]["subfolder"] == "dreambooth" and (tmp_path / "out" / "dreambooth" / ok[0]["filename"]).is_file()


# --- reports list what was found for training, not every file of a folder --------------------------------------------------
def test_report_names_at_most_a_few_non_image_files(tmp_path):
    from comfyui_dreambooth.training.data.report import MAX_NAMED_IGNORED

    folder = images(tmp_path / "home")
    for i in range(MAX_NAMED_IGNORED + 15):
        (tmp_path / "home" / f"private{i:03d}.doc").write_text("x")
    report = ConceptDataset().build(instance_dir=folder, **WIDGETS)["result"][1]
    named = [line for line in report.splitlines() if "IGNORED:" in line and "private" in line]
    assert len(named) == MAX_NAMED_IGNORED
    assert "IGNORED: 15 more file(s)" in report and "instance images: 2" in report
