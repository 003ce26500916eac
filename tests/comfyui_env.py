"""Where the opt-in real-ComfyUI tests find ComfyUI and a Python that runs it.

COMFYUI_DIR: a ComfyUI source tree (main.py, comfy/, nodes.py). COMFYUI_PYTHON: the interpreter of ComfyUI's
environment (default: <COMFYUI_DIR>/../venv/bin/python when it exists, as /work/shared/comfyui/comfyui_up.sh
builds it, else this interpreter). That environment needs this pack's requirements.txt installed (as the README's
ComfyUI install says); the pack itself is put on sys.path through a `comfyui_dreambooth` link to this checkout.
"""
from __future__ import annotations

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "comfyui_dreambooth"


def comfyui_dir() -> str | None:
    path = os.environ.get("COMFYUI_DIR")
    return os.path.abspath(path) if path else None


def comfyui_python() -> str:
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        return explicit
    root = comfyui_dir()
    if root:
        for candidate in (os.path.join(os.path.dirname(root), "venv", "bin", "python"),
                          os.path.join(root, "venv", "bin", "python"), os.path.join(root, ".venv", "bin", "python")):
            if os.path.isfile(candidate):
                return candidate
    return sys.executable


def link_pack(folder: str) -> str:
    """`folder`/comfyui_dreambooth -> this checkout (a custom_nodes entry, or a sys.path entry); returns the link."""
    os.makedirs(folder, exist_ok=True)
    link = os.path.join(folder, PACK_NAME)
    if not os.path.islink(link):
        os.symlink(REPO_ROOT, link)
    return link


def skip_reason() -> str:
    return "opt-in: set COMFYUI_DIR to a ComfyUI source tree (and COMFYUI_PYTHON to its Python if not ../venv)"
