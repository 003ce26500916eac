"""The README's test command works in a clone under any folder name (issue 25): the repository root is the pack and
has an __init__.py; pytest must not import it as a test package named after the folder."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# each case runs pytest in a fresh process (about 4 s): the README run keeps the folder named like the package and
# the custom_nodes layout; the other spellings run with the slow tests (in CI too)
@pytest.mark.parametrize("folder", [pytest.param("comfyui-dreambooth", marks=pytest.mark.slow),
                                    pytest.param("ComfyUI-DreamBooth", marks=pytest.mark.slow), "comfyui_dreambooth",
                                    os.path.join("ComfyUI", "custom_nodes", "comfyui-dreambooth")])
def test_test_command_passes_under_folder_name(tmp_path, folder):
    clone = tmp_path / folder
    (clone / "tests").mkdir(parents=True)
    for name in ("pyproject.toml", "__init__.py"):
        shutil.copy(os.path.join(ROOT, name), clone / name)
    shutil.copy(os.path.join(ROOT, "tests", "conftest.py"), clone / "tests" / "conftest.py")
    (clone / "tests" / "test_probe.py").write_text(
        "def test_probe():\n    import comfyui_dreambooth.training.toyworld.world as w\n    assert w.SIZE == 64\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2"], cwd=clone, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 passed" in out.stdout
