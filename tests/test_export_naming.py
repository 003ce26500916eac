"""training/export/naming.py: user-typed output names never escape their folder."""
import os

import pytest

from comfyui_dreambooth.training.export.naming import clean_relative_name, safe_output_path, unique_path


@pytest.mark.parametrize("typed,expected", [
    ("my_lora", "my_lora"),
    ("people/alice", "people/alice"),
    ("../../etc/passwd", "etc/passwd"),
    ("..", "model"),
    ("/abs/path/x", "abs/path/x"),
    ("C:\\Users\\me\\x", "Users/me/x"),
    ("c:x", "x"),
    ("\\\\server\\share\\x", "server/share/x"),
    ("a/./b//c", "a/b/c"),
    ("con", "con_"),
    ("LPT1.txt", "LPT1.txt_"),
    ("sub/NUL/x", "sub/NUL_/x"),
    ('bad<>:"|?*name', "bad_______name"),
    ("trailing. . ", "trailing"),
    ("", "model"),
    ("   ", "model"),
    ("tab\tnewline\n", "tab_newline"),
])
def test_clean_relative_name(typed, expected):
    assert clean_relative_name(typed) == expected


@pytest.mark.parametrize("typed", ["../escape", "/etc/passwd", "C:\\Windows\\x", "a/../../b", "..\\..\\x", "~/../x"])
def test_safe_output_path_stays_inside(tmp_path, typed):
    path = safe_output_path(str(tmp_path), typed, ".safetensors")
    assert os.path.realpath(path).startswith(os.path.realpath(tmp_path) + os.sep)
    assert path.endswith(".safetensors")


def test_extension_is_not_doubled_and_folders_get_none(tmp_path):
    assert safe_output_path(str(tmp_path), "x.safetensors", ".safetensors") == str(tmp_path / "x.safetensors")
    assert safe_output_path(str(tmp_path), "X.SAFETENSORS", "safetensors") == str(tmp_path / "X.safetensors")
    assert safe_output_path(str(tmp_path), "x.ckpt", ".safetensors") == str(tmp_path / "x.ckpt.safetensors")
    assert safe_output_path(str(tmp_path), "a/b", "") == str(tmp_path / "a" / "b")


def test_symlinked_subfolder_pointing_outside_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "loras"
    folder.mkdir()
    os.symlink(outside, folder / "link")
    with pytest.raises(ValueError, match="outside"):
        safe_output_path(str(folder), "link/x", ".safetensors")


def test_unique_path(tmp_path):
    first = tmp_path / "a.safetensors"
    assert unique_path(str(first)) == str(first)
    first.write_bytes(b"x")
    assert unique_path(str(first)) == str(tmp_path / "a_2.safetensors")
    (tmp_path / "a_2.safetensors").write_bytes(b"x")
    assert unique_path(str(first)) == str(tmp_path / "a_3.safetensors")
    (tmp_path / "pipe.v1").mkdir()
    assert unique_path(str(tmp_path / "pipe.v1")) == str(tmp_path / "pipe.v1_2")
