"""tools/structure.py: the pack has no import circle and no private name crossing modules (issue 22), and the
script really finds both (a circle closed by a function-local import counts)."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "structure.py")


def _run(root):
    return subprocess.run([sys.executable, SCRIPT, str(root)], capture_output=True, text=True, timeout=120)


def test_the_pack_has_no_circle_and_no_private_crossing():
    proc = _run(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "import circles: 0" in proc.stdout and "private names crossing modules: 0" in proc.stdout


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_a_hidden_circle_a_private_crossing_and_a_long_file_are_reported(tmp_path):
    _write(tmp_path, "__init__.py", "")
    _write(tmp_path, "training/__init__.py", "")
    _write(tmp_path, "training/a.py", """
        from .b import helper

        def run():
            return helper()
        """)
    _write(tmp_path, "training/b.py", """
        def helper():
            from .a import run          # function-local: still a circle
            return run

        def _secret():
            return 1
        """)
    _write(tmp_path, "training/c.py", "from . import b\nfrom .b import _secret\nvalue = b._secret()\n")
    _write(tmp_path, "training/long.py", "x = 1\n" * 501)
    _write(tmp_path, "tests/test_x.py", "from training.b import _secret\n")       # tests may reach in
    proc = _run(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "import circles: 1" in out and "training.a <-> training.b" in out
    assert "training.b -> training.a (line 3)" in out
    assert "private names crossing modules: 2" in out
    assert "training/c.py:2: training.b._secret" in out and "training/c.py:3: training.b._secret" in out
    assert "files over 500 lines: 1" in out and "training/long.py: 501" in out


def test_a_clean_tree_exits_0(tmp_path):
    _write(tmp_path, "training/__init__.py", "")
    _write(tmp_path, "training/a.py", "from .b import helper\n")
    _write(tmp_path, "training/b.py", "def helper():\n    return 1\n")
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert "import circles: 0" in proc.stdout
