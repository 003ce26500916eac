"""Issue 10: overwriting replaces a model the pack recognises, never a folder of the user's.

`convert IN OUT --overwrite` deleted whatever OUT was (a user's folder, even `.`) and SaveDiffusers with overwrite
deleted a grouping folder (`people/` holding `alice/` and `bob/`) and every model in it. Now only a diffusers folder
(model_index.json, no other model inside) or a single model file is replaced; anything else is refused with one
line naming the path and what to do, and left exactly as it was.
"""
import os

import pytest

torch = pytest.importorskip("torch")

from comfyui_dreambooth import cli  # noqa: E402
from comfyui_dreambooth.nodes import comfy_compat  # noqa: E402
from comfyui_dreambooth.training.fsutil import ReplaceRefusedError, check_replaceable  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def tree(folder):
    """{relative path: bytes} of every file below `folder` (to prove nothing changed)."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def user_folder(folder):
    os.makedirs(folder / "photos", exist_ok=True)
    (folder / "thesis.txt").write_text("three years of work")
    (folder / "photos" / "a.jpg").write_bytes(b"\xff\xd8 not really")
    return tree(folder)


def grouping_folder(folder, model_folder):
    """people/ holding two diffusers models (alice, bob) and nothing else."""
    import shutil

    for name in ("alice", "bob"):
        shutil.copytree(model_folder, folder / name)
    return tree(folder)


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- the rule ------------------------------------------------------------------------------------------------------
def test_check_replaceable_accepts_only_models(tmp_path):
    check_replaceable(str(tmp_path / "missing"))                      # nothing there
    (tmp_path / "empty").mkdir()
    check_replaceable(str(tmp_path / "empty"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text("{}")
    (tmp_path / "m" / "unet").mkdir()
    check_replaceable(str(tmp_path / "m"))
    (tmp_path / "w.safetensors").write_bytes(b"x")
    check_replaceable(str(tmp_path / "w.safetensors"))

    user_folder(tmp_path / "mine")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "group" / "a").mkdir(parents=True)
    (tmp_path / "group" / "a" / "model_index.json").write_text("{}")
    (tmp_path / "group" / "model_index.json").write_text("{}")       # even with an index at the top
    os.symlink(tmp_path / "m", tmp_path / "link_to_model")
    for path, says in (("mine", "not a diffusers model"), ("notes.txt", "not a model file"),
                       ("group", "holds other models (a)"), ("link_to_model", "is a link to the folder")):
        with pytest.raises(ReplaceRefusedError, match="not replaced") as e:
            check_replaceable(str(tmp_path / path))
        message = str(e.value)
        assert str(tmp_path / path) in message and says in message and "\n" not in message
        assert "choose a new output name" in message


# --- convert --overwrite ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from comfyui_dreambooth.training.models import build_tiny_model, save_single_file

    path = tmp_path_factory.mktemp("models") / "tiny_sd1.safetensors"
    save_single_file(build_tiny_model("sd1", seed=0), str(path), dtype="fp32")
    return str(path)


def test_convert_overwrite_refuses_a_users_folder(capsys, tmp_path, tiny_checkpoint):
    target = tmp_path / "my_documents"
    before = user_folder(target)
    code, out, err = run_cli(capsys, "convert", tiny_checkpoint, target, "--overwrite")
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "not replaced" in lines[0], err
    assert tree(target) == before


def test_convert_overwrite_refuses_the_current_folder(capsys, tmp_path, tiny_checkpoint, monkeypatch):
    work = tmp_path / "work"
    before = user_folder(work)
    monkeypatch.chdir(work)
    for out_arg in (".", "./", str(work)):
        code, _, err = run_cli(capsys, "convert", tiny_checkpoint, out_arg, "--overwrite")
        assert code == 1 and len(err.strip().splitlines()) == 1 and str(work) in err, err
    assert os.path.isdir(work) and tree(work) == before
    assert os.listdir(tmp_path) == ["work"]                           # no leftovers beside it either


def test_convert_overwrite_refuses_a_folder_of_models(capsys, tmp_path, tiny_checkpoint, tiny_files):
    people = tmp_path / "people"
    before = grouping_folder(people, tiny_files["sd1"]["diffusers"])
    code, _, err = run_cli(capsys, "convert", tiny_checkpoint, people, "--overwrite")
    assert code == 1 and "holds other models (alice, bob)" in err, err
    assert tree(people) == before


def test_convert_overwrite_refuses_an_output_holding_the_input(capsys, tmp_path, tiny_files):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_files["sd1"]["diffusers"], model)
    checkpoint = model / "extra.safetensors"
    shutil.copy(tiny_files["sd1"]["safetensors"], checkpoint)
    before = tree(model)
    code, _, err = run_cli(capsys, "convert", checkpoint, model, "--overwrite")
    assert code == 1 and "holds the input" in err, err
    assert tree(model) == before


def test_convert_overwrite_still_replaces_a_model(capsys, tmp_path, tiny_checkpoint):
    out_folder = tmp_path / "out"
    out_folder.mkdir()                                               # an empty folder: nothing to lose
    code, _, err = run_cli(capsys, "convert", tiny_checkpoint, out_folder, "--overwrite")
    assert code == 0, err
    (out_folder / "unet" / "stale.bin").write_bytes(b"old")
    code, _, err = run_cli(capsys, "convert", tiny_checkpoint, out_folder, "--overwrite", "--dtype", "fp16")
    assert code == 0, err
    assert (out_folder / "model_index.json").is_file() and not (out_folder / "unet" / "stale.bin").exists()
    single = tmp_path / "x.safetensors"
    for _ in range(2):
        code, _, err = run_cli(capsys, "convert", out_folder, single, "--overwrite")
        assert code == 0, err


def test_convert_refuses_a_folder_named_like_a_file(capsys, tmp_path, tiny_checkpoint):
    odd = tmp_path / "odd.safetensors"
    before = user_folder(odd)
    code, _, err = run_cli(capsys, "convert", tiny_checkpoint, odd, "--overwrite")
    assert code == 1 and str(odd) in err
    assert tree(odd) == before


# --- SaveDiffusers / save_diffusers ------------------------------------------------------------------------------------
def test_save_diffusers_overwrite_refuses_a_grouping_folder(tmp_path, tiny_files):
    from comfyui_dreambooth.nodes.save import SaveDiffusers
    from comfyui_dreambooth.training.models import build_tiny_model

    model = build_tiny_model("sd1")
    with comfy_compat.using_output_directory(tmp_path):
        people = tmp_path / "diffusers" / "people"
        before = grouping_folder(people, tiny_files["sd1"]["diffusers"])
        with pytest.raises(ReplaceRefusedError, match="holds other models") as e:
            SaveDiffusers().save(model, "people", "fp32", overwrite=True)
        assert str(people) in str(e.value)
        assert tree(people) == before
        assert sorted(os.listdir(people.parent)) == ["people"]       # no temporary folder left beside it

        # the models inside are still replaceable one by one, and overwrite off never replaces
        out = SaveDiffusers().save(model, "people/alice", "fp32", overwrite=True)["result"][0]
        assert out == str(people / "alice") and tree(people / "bob") == {
            k[len("bob/"):]: v for k, v in before.items() if k.startswith("bob/")}
        kept = SaveDiffusers().save(model, "people", "fp32")["result"][0]
        assert kept == str(people.parent / "people_2")


def test_save_diffusers_refuses_a_users_folder(tmp_path):
    from comfyui_dreambooth.training.models import build_tiny_model, save_diffusers

    before = user_folder(tmp_path / "docs")
    with pytest.raises(ReplaceRefusedError):
        save_diffusers(build_tiny_model("sd1"), str(tmp_path / "docs"), dtype="fp32")
    with pytest.raises(ReplaceRefusedError):
        save_diffusers(build_tiny_model("sd1"), str(tmp_path / "docs") + "/", dtype="fp32")
    assert tree(tmp_path / "docs") == before
