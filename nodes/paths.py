"""Paths typed into node inputs: how they are read, and the folder check every one goes through.

The rule itself lives in training/access.py; this module only gathers what ComfyUI says (its folders, its --listen
address, through comfy_compat) and turns a typed text into a path:
  * surrounding spaces and quotes are dropped; environment variables are never expanded (`/tmp/${SECRET}` stays
    that text, so a secret can never end up in an error message), and `~` is the home folder only headless;
  * inside a ComfyUI server that others can reach, the path (symlinks resolved) must be inside ComfyUI's own
    folders or a folder the user allowed, else PathNotAllowedError names the node input, the path and how to
    allow it. Headless (the CLI and runner) and on a loopback-only server every path is allowed.
"""
from __future__ import annotations

import os

from ..training.access import UNRESTRICTED, AccessPolicy, PathNotAllowedError, is_loopback, read_allowed_dirs
from . import comfy_compat as compat

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


__all__ = ["access_policy", "typed_path", "check_path", "path_allowed", "PathNotAllowedError"]
