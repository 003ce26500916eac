"""Turning a user-typed output name into a path that cannot leave its folder.

Names come from a text widget (or a workflow file someone sent you), so they may contain "../", an absolute path,
a Windows drive letter, characters Windows forbids, or a reserved device name (CON, NUL, COM1...). We clean rather
than refuse, because a typo should not cost a finished training run: "../../etc/x" becomes "etc/x", "C:\\a\\b"
becomes "a/b", "con" becomes "con_". Subfolders ("people/alice") are kept. After cleaning, the resolved path
(symlinks followed) must still be inside the folder, or ValueError is raised.
"""
from __future__ import annotations

import os
import re

_ILLEGAL_CHARS = re.compile(r'[<>:"|?*\x00-\x1f]')
_DRIVE = re.compile(r"^[A-Za-z]:")
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
MAX_PART_LENGTH = 200


def _clean_part(part: str) -> str:
    part = _ILLEGAL_CHARS.sub("_", part).strip().rstrip(". ")
    if part in ("", ".", ".."):
        return ""
    if part.split(".")[0].upper() in _RESERVED:     # Windows reserves "CON" and "CON.anything"
        part = part + "_"
    return part[:MAX_PART_LENGTH]


def clean_relative_name(name: str, default: str = "model") -> str:
    """A relative name with "/" separators and no "..", absolute root, drive letter or illegal character."""
    text = str(name).replace("\\", "/").strip()
    text = _DRIVE.sub("", text)
    parts = [_clean_part(p) for p in text.split("/")]
    parts = [p for p in parts if p]
    return "/".join(parts) or default


def _inside(folder: str, path: str) -> bool:
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def safe_output_path(folder: str, name: str, ext: str = "") -> str:
    """`folder`/<cleaned name><ext>; `ext` (".safetensors", or "" for a folder) is not doubled if already typed."""
    if ext and not ext.startswith("."):
        ext = "." + ext
    relative = clean_relative_name(name)
    if ext and relative.lower().endswith(ext.lower()):
        relative = relative[: -len(ext)].rstrip(". ") or "model"
    path = os.path.join(os.path.abspath(folder), *relative.split("/")) + ext
    if not _inside(folder, path):
        raise ValueError(f"output name {name!r} resolves outside {folder} (a symlinked subfolder?); "
                         f"choose a plain name")
    return path


def unique_path(path: str) -> str:
    """`path` if nothing is there yet, else the first free `<stem>_2<ext>`, `<stem>_3<ext>`, ..."""
    if not os.path.exists(path):
        return path
    folder, base = os.path.split(path)
    stem, ext = os.path.splitext(base)
    if os.path.isdir(path):             # a diffusers folder has no extension to split off
        stem, ext = base, ""
    n = 2
    while os.path.exists(os.path.join(folder, f"{stem}_{n}{ext}")):
        n += 1
    return os.path.join(folder, f"{stem}_{n}{ext}")


__all__ = ["safe_output_path", "clean_relative_name", "unique_path"]
