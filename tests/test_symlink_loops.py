"""Issue 10: symlink loops are walked once, never forever.

A folder holding `up -> ..` (twice) made glob("**") in file_hash (LoadBaseModel, `info`) and os.walk(followlinks)
in the models/diffusers list recurse until the path was too long — with two loops 2**40 paths, a hang. Each test
runs the walk under a time limit (SIGALRM in-process, a subprocess timeout for the CLI), so a regression fails
instead of hanging CI.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from comfyui_dreambooth.nodes import comfy_compat
from comfyui_dreambooth.training.fsutil import walk, walk_files

pytestmark = pytest.mark.skipif(os.name != "posix" or not hasattr(signal, "SIGALRM"),
                                reason="symlinks and SIGALRM")

LIMIT_S = 20


class StillWalking(Exception):
    """Not an OSError (TimeoutError is one): os.walk and glob swallow OSErrors and would walk on."""


@contextlib.contextmanager
def time_limit(seconds=LIMIT_S):
    def expired(signum, frame):
        raise StillWalking(f"still walking after {seconds}s: a symlink loop is followed forever")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def add_loops(folder):
    """Two links back up (2**depth paths if followed), a link to itself and a dangling one."""
    os.symlink("..", os.path.join(folder, "up"))
    os.symlink("..", os.path.join(folder, "up2"))
    os.symlink("self", os.path.join(folder, "self"))
    os.symlink("/nonexistent/target", os.path.join(folder, "dangling"))


def test_walk_enters_each_real_folder_once(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f.txt").write_text("x")
    (tmp_path / "top.txt").write_text("x")
    add_loops(tmp_path / "a" / "b")
    os.symlink(tmp_path / "a", tmp_path / "a_again")          # a second link to the same folder
    with time_limit():
        folders = [os.path.relpath(f, tmp_path) for f, _, _ in walk(str(tmp_path))]
        files = walk_files(str(tmp_path))
    assert sorted(folders) == [".", "a", "a/b"]
    assert files == [str(tmp_path / "a" / "b" / "f.txt"), str(tmp_path / "top.txt")]


def test_walk_follows_a_linked_folder_elsewhere(tmp_path):
    """Following links stays: a models folder linked from another disk is listed."""
    (tmp_path / "disk" / "m").mkdir(parents=True)
    (tmp_path / "disk" / "m" / "model_index.json").write_text("{}")
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path / "disk", tmp_path / "root" / "linked")
    with time_limit():
        assert walk_files(str(tmp_path / "root")) == [str(tmp_path / "root" / "linked" / "m" / "model_index.json")]


def test_file_hash_of_a_folder_with_loops_is_the_hash_without_them(tmp_path):
    from comfyui_dreambooth.training.models.state_dict import file_hash

    folder = tmp_path / "m"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "w.bin").write_bytes(b"\0" * 100)
    (folder / ".hidden").write_text("not hashed")          # as glob("*") left hidden files out
    before = file_hash(str(folder))
    add_loops(folder / "unet")
    with time_limit():
        after = file_hash(str(folder))
    assert after == before


def test_diffusers_list_with_loops_in_models_diffusers(tmp_path):
    """LoadBaseModel's list (models/diffusers walked for model_index.json) with loops in it."""
    with comfy_compat.using_output_directory(tmp_path):
        root = tmp_path / "diffusers"
        for name in ("one", "group/two"):
            (root / name).mkdir(parents=True)
            (root / name / "model_index.json").write_text("{}")
        add_loops(root / "group")
        add_loops(root / "one")
        os.symlink(root, root / "group" / "two" / "back_to_root")
        with time_limit():
            assert comfy_compat.list_diffusers_folders() == ["group/two", "one"]
            from comfyui_dreambooth.nodes.models import model_choices
            assert "diffusers/one" in model_choices()


def test_checkpoint_list_with_loops(tmp_path):
    with comfy_compat.using_output_directory(tmp_path):
        (tmp_path / "checkpoints" / "sub").mkdir(parents=True)
        (tmp_path / "checkpoints" / "sub" / "m.safetensors").write_bytes(b"x")
        add_loops(tmp_path / "checkpoints" / "sub")
        with time_limit():
            assert comfy_compat.list_models("checkpoints") == ["sub/m.safetensors"]


def test_instance_folder_with_loops_is_scanned_once(tmp_path):
    from PIL import Image

    from comfyui_dreambooth.nodes.concepts import ConceptDataset
    from comfyui_dreambooth.training.data.scan import scan_folder

    folder = tmp_path / "dog"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (i * 80, 0, 0)).save(folder / f"{i}.png")
    add_loops(folder)
    os.symlink(folder, folder / "again")
    with time_limit():
        scan = scan_folder(str(folder), lambda p: ("sks dog", "prompt", ""))
        changed = ConceptDataset.IS_CHANGED(instance_dir=str(folder), class_dir="")
    assert [os.path.basename(i.path) for i in scan.images] == ["0.png", "1.png"]
    assert changed


@pytest.mark.slow
def test_info_cli_on_a_diffusers_folder_with_loops_finishes(tmp_path, tiny_files):
    """`comfyui-dreambooth info` hung on such a folder (file_hash); run as a subprocess with a timeout."""
    folder = tmp_path / "tiny"
    shutil.copytree(tiny_files["sd1"]["diffusers"], folder)
    add_loops(folder / "unet")
    add_loops(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        out = subprocess.run([sys.executable, "-m", "comfyui_dreambooth", "info", str(folder)], capture_output=True,
                             text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("info on a diffusers folder with symlink loops did not finish within 240 s")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["format"] == "diffusers"
