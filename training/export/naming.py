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
# Lengths are limited in BYTES by file systems: 255 per file or folder name (ext4, btrfs, xfs, APFS, ZFS; NTFS
# counts 255 UTF-16 units), 4096 for a whole path on Linux. 200 characters of "é" are 400 bytes.
NAME_MAX_BYTES = 255
PATH_MAX_BYTES = 4096
SAVE_ROOM_BYTES = 24       # a safe save writes ".<name>.<12 hex>.tmp" beside the target; "_2", "_3"... copies
EXT_ROOM_BYTES = 16        # ".safetensors", "_00001_.png", ...
MAX_PART_BYTES = NAME_MAX_BYTES - SAVE_ROOM_BYTES - EXT_ROOM_BYTES
MAX_NAME_DEPTH = 32        # folder levels in a typed name ("a/b/c/name")
MAX_PATH_DEPTH = 200       # folder levels in a whole path (os.makedirs recurses once per missing level)


def _nbytes(text: str) -> int:
    return len(str(text).encode("utf-8", "surrogatepass"))


def _shown(text: str, limit: int = 60) -> str:
    """`text` for a message: cut in the middle (start and end kept) when longer than `limit` characters."""
    text = str(text)
    return text if len(text) <= limit else text[:limit // 2 - 2] + "..." + text[-(limit // 2 - 2):]


def _fit_bytes(part: str, max_bytes: int) -> str:
    """`part` cut (at a character boundary) to at most `max_bytes` bytes of UTF-8."""
    data = part.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return part
    return data[:max_bytes].decode("utf-8", "ignore").rstrip(". ")


def _clean_part(part: str, max_bytes: int | None = MAX_PART_BYTES) -> str:
    part = _ILLEGAL_CHARS.sub("_", part).strip().rstrip(". ")
    if part in ("", ".", ".."):
        return ""
    if part.split(".")[0].upper() in _RESERVED:     # Windows reserves "CON" and "CON.anything"
        part = part + "_"
    part = part[:MAX_PART_LENGTH]
    return part if max_bytes is None else _fit_bytes(part, max_bytes)


def _clean_parts(name: str, max_bytes: int | None = MAX_PART_BYTES) -> list[str]:
    text = str(name).replace("\\", "/").strip()
    text = _DRIVE.sub("", text)
    parts = [_clean_part(p, max_bytes) for p in text.split("/")]
    return [p for p in parts if p]


def clean_relative_name(name: str, default: str = "model") -> str:
    """A relative name with "/" separators and no "..", absolute root, drive letter or illegal character; each
    part cut to fit the file system's name limit (in bytes) with room for an extension."""
    return "/".join(_clean_parts(name)) or default


def output_name_problem(name, folder: str = "", ext: str = "") -> str | None:
    """Why the file system would refuse `name` (a save node's typed file name, saved under `folder` with `ext`) as
    too long, or None. For the nodes' VALIDATE_INPUTS: the graph is refused before training, not after it. A name
    that reaches a save unchecked (linked from another node) is cut to fit instead (see clean_relative_name)."""
    if not isinstance(name, str):
        return None                        # linked: the value arrives when the graph runs
    parts = _clean_parts(name, max_bytes=None)
    for part in parts:
        size = _nbytes(part)
        if size > MAX_PART_BYTES:
            return (f"too long: {_shown(part)!r} is {size} bytes in UTF-8 and a name can have at most "
                    f"{MAX_PART_BYTES} here (file systems allow {NAME_MAX_BYTES} bytes per file or folder name; the "
                    f"rest is room for the extension and the temporary file of a safe save); shorten it")
    if len(parts) > MAX_NAME_DEPTH:
        return f"too long: {len(parts)} folder levels, at most {MAX_NAME_DEPTH}; use fewer '/'"
    if folder:
        total = _nbytes(os.path.join(os.path.abspath(folder), *parts)) + max(_nbytes(ext), EXT_ROOM_BYTES)
        if total > PATH_MAX_BYTES - SAVE_ROOM_BYTES:
            return (f"too long: the saved path would be {total} bytes, at most {PATH_MAX_BYTES - SAVE_ROOM_BYTES}; "
                    f"shorten it")
    return None


def path_length_problem(path: str, room: int = 0) -> str | None:
    """Why the file system would refuse `path` (a folder to create or write into) as too long, or None. `room`:
    bytes kept free for what goes inside it."""
    path = os.path.abspath(str(path))
    total, limit = _nbytes(path), PATH_MAX_BYTES - room
    if total > limit:
        return f"too long: {total} bytes, at most {limit} (the file system's limit is {PATH_MAX_BYTES} per path)"
    parts = [p for p in path.replace("\\", "/").split("/") if p]
    for part in parts:
        if _nbytes(part) > NAME_MAX_BYTES:
            return (f"too long: the name {_shown(part)!r} in it is {_nbytes(part)} bytes, at most {NAME_MAX_BYTES} "
                    f"per file or folder name")
    if len(parts) > MAX_PATH_DEPTH:
        return f"too long: {len(parts)} folder levels, at most {MAX_PATH_DEPTH}"
    return None


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
    problem = output_name_problem(relative, folder, ext)      # what cleaning cannot fix: depth, whole path
    if problem:
        raise ValueError(f"output name {_shown(name)!r}: {problem}")
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


__all__ = ["safe_output_path", "clean_relative_name", "unique_path", "output_name_problem",
           "path_length_problem"]
