"""Atomic file and folder writes: a crash, kill -9 or full disk never leaves a half-written output in place.

Outputs get the permissions any file the user makes gets (0o666 / 0o777 less the umask: 0644 / 0755 with the usual
umask 022), so a shared models folder, a web server or another user can read them. Writers such as safetensors
create their files 0600 whatever the umask, so the finished temporary file (or every file and folder in a temporary
folder) is set to the mode the kernel gave our own freshly created temporary file / folder, i.e. the umask's. The
umask itself is never read or changed (os.umask is process-global: setting it to read it would race with every
other thread creating files, such as the rest of ComfyUI).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import uuid

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def _create_temporary(folder: str, prefix: str) -> str:
    """A new empty file in `folder` with the umask's permissions (unlike tempfile.mkstemp's fixed 0600)."""
    for _ in range(100):
        tmp = os.path.join(folder, f"{prefix}{uuid.uuid4().hex[:12]}.tmp")
        try:
            fd = os.open(tmp, _CREATE_FLAGS, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"{folder}: no free temporary file name")


def _set_mode(path: str, mode: int) -> None:
    st = os.lstat(path)
    if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    On any error the temporary file is removed and the previous `path` (if any) is untouched.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = _create_temporary(folder, "." + os.path.basename(path) + ".")
    try:
        file_mode = stat.S_IMODE(os.stat(tmp).st_mode)     # 0o666 less the umask
        yield tmp
        _set_mode(tmp, file_mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_write_json(path: str, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: str, record: dict) -> None:
    """One JSON line added to a log (loss.jsonl, validation.jsonl)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """A log's records; [] when it does not exist. A line cut by a crash ends the log."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                break
    return out


@contextlib.contextmanager
def atomic_folder(path: str):
    """Yield a temporary folder beside `path`; on success it takes `path`'s place (an old one is removed)."""
    path = os.path.abspath(path.rstrip("/\\"))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    os.makedirs(tmp)
    try:
        folder_mode = stat.S_IMODE(os.stat(tmp).st_mode)   # 0o777 less the umask
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                _set_mode(os.path.join(root, name), folder_mode)
            for name in files:
                _set_mode(os.path.join(root, name), folder_mode & 0o666)
        old = None
        if os.path.exists(path):
            old = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------------------------
# Walking folders that may hold symlink loops
# ------------------------------------------------------------------------------------------------------------------
def _dir_key(path: str):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def walk(root: str, *, follow_links: bool = True, skip_hidden: bool = False):
    """os.walk (top-down, sorted) that enters every real directory once.

    Symlinked folders are followed (a models folder linked from another disk is normal), but a folder already
    seen — a link to a parent (`loop -> ..`), to itself, or a second link to the same place — is not entered
    again, so a symlink loop is walked once instead of forever. `skip_hidden`: leave out names starting with "."
    (what glob's "*" does). The caller may prune the yielded `dirs` list further, as with os.walk.
    """
    try:
        seen = {_dir_key(root)}
    except OSError:
        return
    for folder, dirs, files in os.walk(root, followlinks=follow_links):
        kept = []
        for name in sorted(dirs):
            if skip_hidden and name.startswith("."):
                continue
            try:
                key = _dir_key(os.path.join(folder, name))
            except OSError:          # a broken or looping link (ELOOP): nothing to enter
                continue
            if key in seen:
                continue
            seen.add(key)
            kept.append(name)
        dirs[:] = kept
        yield folder, dirs, sorted(f for f in files if not (skip_hidden and f.startswith(".")))


def walk_files(root: str, *, follow_links: bool = True, skip_hidden: bool = False) -> list[str]:
    """Every regular file under `root` (full paths, sorted), each real directory visited once (see walk)."""
    found = []
    for folder, _dirs, files in walk(root, follow_links=follow_links, skip_hidden=skip_hidden):
        found += [p for p in (os.path.join(folder, f) for f in files) if os.path.isfile(p)]
    return sorted(found)


# ------------------------------------------------------------------------------------------------------------------
# Overwriting: only a model the pack recognises is ever replaced
# ------------------------------------------------------------------------------------------------------------------
MODEL_FILE_EXTENSIONS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_INDEX = "model_index.json"


class ReplaceRefusedError(ValueError):
    """An output that exists and is not a model this pack recognises: replacing it could delete the user's files."""


def _nested_models(folder: str, limit: int = 3, max_depth: int | None = None) -> list[str]:
    """Up to `limit` sub-folders of `folder` (links not followed, at most `max_depth` levels down) that are
    diffusers models themselves."""
    found = []
    for sub, dirs, files in walk(folder, follow_links=False):
        relative = os.path.relpath(sub, folder)
        depth = 0 if relative == "." else relative.count(os.sep) + 1
        if max_depth is not None and depth >= max_depth:
            dirs[:] = []
        if depth and DIFFUSERS_INDEX in files:
            found.append(relative.replace(os.sep, "/"))
            if len(found) >= limit:
                break
    return found


def check_replaceable(path: str) -> None:
    """Raise ReplaceRefusedError unless replacing `path` can only lose a model the pack recognises.

    Replaceable: nothing there, an empty folder, a diffusers folder (model_index.json) that holds no other
    diffusers model below it, or a single model file (.safetensors, .ckpt, ...). Refused: any other folder (a
    user's folder, ".", a grouping folder such as people/ holding alice/ and bob/), a link to a folder, any other
    file. The message names the path and what to do.
    """
    path = os.path.abspath(path)
    if not os.path.lexists(path):
        return
    todo = "choose a new output name, or move or delete it yourself first"
    if os.path.isdir(path):
        if os.path.islink(path):
            raise ReplaceRefusedError(f"{path}: not replaced: it is a link to the folder {os.path.realpath(path)}; "
                                      f"{todo}")
        try:
            entries = os.listdir(path)
        except OSError as e:
            raise ReplaceRefusedError(f"{path}: not replaced: cannot look inside ({e.strerror or e}); {todo}") \
                from None
        if not entries:
            return
        is_model = os.path.isfile(os.path.join(path, DIFFUSERS_INDEX))
        nested = _nested_models(path, max_depth=None if is_model else 2)   # a user's folder may be huge: a look
        if not is_model and not nested:
            raise ReplaceRefusedError(f"{path}: not replaced: this folder is not a diffusers model (no "
                                      f"{DIFFUSERS_INDEX}), so replacing it would delete everything in it; {todo}")
        if nested:
            raise ReplaceRefusedError(f"{path}: not replaced: it holds other models ({', '.join(nested)}), which "
                                      f"replacing it would delete; {todo}")
        return
    if os.path.isfile(path) and path.lower().endswith(MODEL_FILE_EXTENSIONS):
        return
    raise ReplaceRefusedError(f"{path}: not replaced: it is not a model file ({', '.join(MODEL_FILE_EXTENSIONS)}) "
                              f"or diffusers folder; {todo}")
