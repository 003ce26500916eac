"""Paths in and out of the nodes: paths typed into node inputs (how they are read, and the folder check every one
goes through), and paths shown to a browser (public_path / public_text: relative to ComfyUI's folders, never an
absolute path).

The rule itself lives in training/access.py; this module only gathers what ComfyUI says (its folders, its --listen
address, through comfy_compat) and turns a typed text into a path:
  * surrounding spaces and quotes are dropped; environment variables are never expanded (`/tmp/${SECRET}` stays
    that text, so a secret can never end up in an error message), and `~` is the home folder only headless;
  * inside a ComfyUI server that others can reach, the path (symlinks resolved) must be inside ComfyUI's own
    folders or a folder the user allowed, else PathNotAllowedError names the node input, the path and how to
    allow it. Headless (the CLI and runner) and on a loopback-only server every path is allowed.
"""
from __future__ import annotations

import logging
import os
import re

from ..training.access import UNRESTRICTED, AccessPolicy, PathNotAllowedError, is_loopback, read_allowed_dirs
from . import comfy_compat as compat

log = logging.getLogger(__name__)

_ROOTS_DESCRIBED = "ComfyUI's input, output and models folders, and the folders allowed for DreamBooth"


def access_policy() -> AccessPolicy:
    """Unrestricted headless and on a loopback-only server; else ComfyUI's folders plus the allowed ones."""
    if not compat.in_comfyui():
        return UNRESTRICTED
    allowed = read_allowed_dirs()
    listen = compat.server_listen()
    if allowed.allow_all_on_loopback and is_loopback(listen):
        return UNRESTRICTED
    if listen is None:
        why = "the server's listen address is unknown"
    elif is_loopback(listen):
        why = "allow_all_on_loopback is false in the pack's folder config"
    else:
        why = f"the server listens on {listen}"
    return AccessPolicy(unrestricted=False, roots=tuple(compat.data_roots()) + tuple(allowed.folders),
                        why_restricted=why, roots_described=_ROOTS_DESCRIBED)


def typed_path(text: str) -> str:
    """A path as typed: stripped of spaces and quotes; `~` expanded headless only; never environment variables."""
    path = str(text or "").strip().strip('"').strip("'").strip()
    if path.startswith("~") and not compat.in_comfyui():
        path = os.path.expanduser(path)
    return path


def check_path(path: str, what: str, *, write: bool = False) -> str:
    """`path` made absolute, after the folder check (PathNotAllowedError naming `what`, e.g. "ConceptDataset
    instance_dir")."""
    path = os.path.abspath(path)
    return access_policy().check(path, what=what, write=write)


def path_allowed(path: str) -> bool:
    """True when the folder check would let `path` through (for IS_CHANGED, which must not raise or read)."""
    try:
        return access_policy().allows(os.path.abspath(path))
    except ValueError:         # a broken folder config: the node's own call reports it
        return False


# ---- paths the browser may see (the live panel's state and messages) ------------------------------------------
# An absolute path in free text: POSIX (/a/b, not the tail of a URL or of a relative path "x/y") or Windows (C:\a).
ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\\-])/[^\s'\"<>|/]+(?:/[^\s'\"<>|/]+)*/?"
                           r"|(?<![\w])[A-Za-z]:[\\/][^\s'\"<>|]*")


def _folders() -> list[tuple[str, str]]:
    """ComfyUI's folders that may be named to a browser, as (normalised path, label), longest path first."""
    try:
        folders = compat.public_folders()
    except Exception:  # noqa: BLE001 - never let path hygiene break a run; everything then shows as basenames
        log.debug("could not list ComfyUI's folders", exc_info=True)
        folders = []
    found = {}
    for path, label in folders:
        for variant in {os.path.normpath(path), os.path.realpath(path)}:
            if len(variant) > 1 and variant not in found:      # never "/" (it would name everything)
                found[variant] = label
    return sorted(found.items(), key=lambda item: -len(item[0]))


def _last_component(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1] or path


def public_path(path, folders=None) -> str:
    """`path` as a browser may see it: "output/dreambooth/run-1" under ComfyUI's output folder (likewise input,
    temp, models, models/<kind>), else only its last component. Relative paths are returned as they are."""
    path = str(path or "")
    if not path or not (os.path.isabs(path) or ABSOLUTE_PATH.fullmatch(path)):
        return path
    folders = _folders() if folders is None else folders
    for candidate in dict.fromkeys([os.path.normpath(path), os.path.realpath(path)]):
        for root, label in folders:
            if candidate == root:
                return label
            if candidate.startswith(root.rstrip(os.sep) + os.sep):
                return label + "/" + os.path.relpath(candidate, root).replace(os.sep, "/")
    return _last_component(path)


def public_text(text) -> str:
    """A message with every absolute path in it replaced by public_path() (folders first, so paths with spaces
    inside ComfyUI's folders come out whole)."""
    text = str(text or "")
    if not ABSOLUTE_PATH.search(text):   # the common case ("caching latents: 3/8"): no folder lookups per stage line
        return text
    folders = _folders()
    for root, label in folders:
        text = re.sub(re.escape(root) + r"(?=$|[\\/\s'\",;:)\]])(?:[\\/](?=\S))?",
                      lambda m, label=label: label + ("/" if m.group(0)[-1:] in "/\\" else ""), text)
    return ABSOLUTE_PATH.sub(lambda m: public_path(m.group(0), folders), text)


__all__ = ["access_policy", "typed_path", "check_path", "path_allowed", "PathNotAllowedError", "public_path",
           "public_text", "ABSOLUTE_PATH"]
