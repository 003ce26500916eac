"""Which folders the pack may read and write when it runs inside a ComfyUI server others can reach.

Plain Python, no ComfyUI import: the node side (nodes/paths.py) gathers ComfyUI's folders and its --listen
address and asks an `AccessPolicy` built here.

The rule, like ComfyUI's own nodes: the pack reads images from ComfyUI's input folder, reads and writes under its
output and models folders, and touches other folders only where the user allowed them (ALLOWED_DIRS_ENV, or a
config file beside the pack, CONFIG_FILES). A server that listens on loopback addresses only is used by the local
user, who already owns the machine: there every folder is allowed (unless the config file says
"allow_all_on_loopback": false). Headless (the CLI, the workflow runner) every path the user gives is allowed.

Containment is decided on real paths (symlinks resolved), so a link inside an allowed folder that points elsewhere
does not open the place it points to.
"""
from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field

ALLOWED_DIRS_ENV = "COMFYUI_DREAMBOOTH_ALLOWED_DIRS"
CONFIG_FILES = ("dreambooth_paths.json", "dreambooth_paths.txt")
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PathNotAllowedError(PermissionError):
    """A node input names a path outside the folders this server lets the pack use."""


def is_inside(root: str, path: str) -> bool:
    """True when `path` is `root` or below it, both with symlinks resolved."""
    root_real = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def is_loopback(listen: str | None) -> bool:
    """True when every address of ComfyUI's --listen value (comma-separated) is a loopback address.

    None or an empty value means "unknown": not loopback (the safe answer).
    """
    if not listen or not str(listen).strip():
        return False
    for part in str(listen).split(","):
        host = part.strip().strip("[]")
        if not host:
            continue
        if host.lower() == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:           # a host name other than localhost: may resolve to anything
            return False
    return True


@dataclass
class AllowedDirs:
    """Folders the user opened to the pack, and where that was said."""

    folders: list[str] = field(default_factory=list)
    allow_all_on_loopback: bool = True
    sources: list[str] = field(default_factory=list)


def _absolute_entry(entry: str, source: str) -> str:
    text = str(entry).strip()
    path = os.path.expanduser(text)            # the admin's own config: "~/datasets" is convenient and harmless
    if not os.path.isabs(path):
        raise ValueError(f"{source}: {text!r} is not an absolute folder path; write the full path "
                         f"(e.g. /data/datasets)")
    return os.path.normpath(path)


def config_path(config_dir: str | None = None) -> str:
    """The config file the pack reads (the first of CONFIG_FILES that exists), else where the JSON one would go."""
    folder = PACK_ROOT if config_dir is None else config_dir
    for name in CONFIG_FILES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return os.path.join(folder, CONFIG_FILES[0])


def read_allowed_dirs(environ=None, config_dir: str | None = None) -> AllowedDirs:
    """The allowed folders from ALLOWED_DIRS_ENV (os.pathsep-separated) and the config file beside the pack.

    dreambooth_paths.json: {"allowed_dirs": ["/data/datasets", ...], "allow_all_on_loopback": true} (or just a
    list of folders). dreambooth_paths.txt: one folder per line, "#" starts a comment.
    A malformed file or a relative entry raises ValueError naming the file and the entry.
    """
    environ = os.environ if environ is None else environ
    result = AllowedDirs()
    raw = environ.get(ALLOWED_DIRS_ENV, "")
    if raw.strip():
        result.sources.append(ALLOWED_DIRS_ENV)
        result.folders += [_absolute_entry(p, ALLOWED_DIRS_ENV) for p in raw.split(os.pathsep) if p.strip()]
    path = config_path(config_dir)
    if not os.path.isfile(path):
        return result
    result.sources.append(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the pack's folder config ({e.strerror or e})") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text) if text.strip() else {}
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected {{\"allowed_dirs\": [\"/data/datasets\"]}}") \
                from None
        if isinstance(data, list):
            data = {"allowed_dirs": data}
        if not isinstance(data, dict) or not isinstance(data.get("allowed_dirs", []), list):
            raise ValueError(f"{path}: expected {{\"allowed_dirs\": [\"/data/datasets\", ...]}}")
        unknown = sorted(set(data) - {"allowed_dirs", "allow_all_on_loopback"})
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; known: allowed_dirs, "
                             f"allow_all_on_loopback")
        loopback = data.get("allow_all_on_loopback", True)
        if not isinstance(loopback, bool):
            raise ValueError(f"{path}: allow_all_on_loopback must be true or false, not {loopback!r}")
        result.allow_all_on_loopback = loopback
        entries = data.get("allowed_dirs", [])
        if not all(isinstance(e, str) for e in entries):
            raise ValueError(f"{path}: allowed_dirs must be a list of folder paths (strings)")
    else:
        entries = [line.split("#", 1)[0] for line in text.splitlines()]
    result.folders += [_absolute_entry(e, path) for e in entries if e.strip()]
    return result


def how_to_allow(config_dir: str | None = None) -> str:
    return (f"add the folder to {ALLOWED_DIRS_ENV} (folders separated by '{os.pathsep}') or to "
            f"{config_path(config_dir)}, see the README's 'File access'")


@dataclass
class AccessPolicy:
    """unrestricted, or the root folders (read and write) a path must be inside after resolving symlinks."""

    unrestricted: bool
    roots: tuple = ()
    why_restricted: str = ""            # e.g. "the server listens on 0.0.0.0"
    roots_described: str = ""           # e.g. "ComfyUI's input, output and models folders"
    config_dir: str | None = None

    def allows(self, path: str) -> bool:
        return self.unrestricted or any(is_inside(root, path) for root in self.roots)

    def check(self, path: str, *, what: str, write: bool = False) -> str:
        """`path` (absolute) when allowed, else PathNotAllowedError naming `what` (the node input), the path and
        how to allow it. The path is returned as given; containment was decided on its real path."""
        if self.allows(path):
            return path
        real = os.path.realpath(path)
        shown = repr(path) + (f" (a link to {real!r})" if real != os.path.abspath(path) else "")
        verb = "write to" if write else "read"
        where = self.roots_described or "its own folders"
        why = f" because {self.why_restricted}" if self.why_restricted else ""
        raise PathNotAllowedError(f"{what}: {shown} is outside the folders this ComfyUI server lets DreamBooth "
                                  f"{verb} ({where}){why}. Move it there, or allow it: "
                                  f"{how_to_allow(self.config_dir)}")


UNRESTRICTED = AccessPolicy(unrestricted=True)

__all__ = ["ALLOWED_DIRS_ENV", "CONFIG_FILES", "PathNotAllowedError", "is_inside", "is_loopback", "AllowedDirs",
           "read_allowed_dirs", "config_path", "how_to_allow", "AccessPolicy", "UNRESTRICTED"]
