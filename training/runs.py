"""Run folders: config.json, loss log, previews, resumable checkpoints, the final result.

    <root>/dreambooth/<name>-<YYYYmmdd-HHMMSS>/
        config.json              settings, concepts, dataset report, base model + hash, library versions, run id
        dataset_report.txt
        loss.jsonl               one line per optimizer step: step, epoch, loss, lr, time
        validation.jsonl         with validate_every_steps: one line per validation (training/validation.py)
        previews/                epoch-0005_0.png ... (validation grids: validation-step-0000100.png ...)
        events.out.tfevents.*    with the tensorboard setting (training/board.py)
        checkpoints/step-000120/ trainable.safetensors, ema.safetensors, optimizer.pt, state.json
        final/                   the same layout, written when the run finishes; `finished` in config.json

Every write is atomic (folders are written beside and renamed into place), so a crash, kill -9 or a full disk
leaves the previous checkpoint whole. `run_id` (settings + data + base model) lets a finished identical run be
found again and reused instead of retrained.
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import json
import os
import shutil
import socket

from .fsutil import append_jsonl, atomic_folder, atomic_write_json, read_jsonl

RUNS_SUBFOLDER = "dreambooth"
LOCK_FILE = ".lock"


class RunInUseError(RuntimeError):
    """Another process is training in this run folder (two writers would interleave its log and checkpoints)."""


def library_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def compute_run_id(settings_hash: str, concepts: list, item_hashes: list[str], model_hash: str,
                   adapter_or_full: str, processes: int = 1) -> str:
    h = hashlib.sha256()
    identity = {"settings": settings_hash, "concepts": concepts, "model": model_hash, "kind": adapter_or_full}
    if processes > 1:          # other effective batch and data split (one process keeps its old ids)
        identity["processes"] = processes
    h.update(json.dumps(identity, sort_keys=True, default=str).encode())
    for item in sorted(item_hashes):
        h.update(item.encode())
    return h.hexdigest()[:16]


def _clean_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "._- " else "_" for c in (name or "dreambooth")).strip(" .")
    return keep[:80] or "dreambooth"


class RunFolder:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    # ---- creation / discovery -------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str, name: str, config: dict) -> "RunFolder":
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = os.path.join(root, RUNS_SUBFOLDER, f"{_clean_name(name)}-{stamp}")
        os.makedirs(os.path.dirname(base), exist_ok=True)
        path, n = base, 2
        while True:          # claim the name atomically: two processes starting in the same second get two
            try:
                os.mkdir(path)
                break
            except FileExistsError:
                path, n = f"{base}-{n}", n + 1
        try:                 # from here the folder is this process's own
            os.makedirs(os.path.join(path, "previews"))
            os.makedirs(os.path.join(path, "checkpoints"))
            run = cls(path)
            run.write_config(config)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)        # a half-made run folder is no run
            raise
        return run

    @staticmethod
    def all_runs(root: str) -> list["RunFolder"]:
        """Every run under `root`, oldest first (by creation time: folder names start with the run name)."""
        runs = [RunFolder(os.path.dirname(p)) for p in glob.glob(os.path.join(root, RUNS_SUBFOLDER, "*", "config.json"))]
        return sorted(runs, key=lambda run: (run.read_config().get("created", ""), run.path))

    @classmethod
    def find(cls, root: str, run_id: str, *, finished: bool) -> "RunFolder | None":
        """The newest run with this id (finished ones only, or unfinished ones with a checkpoint)."""
        for run in reversed(cls.all_runs(root)):
            cfg = run.read_config()
            if cfg.get("run_id") != run_id:
                continue
            if finished and cfg.get("finished") and os.path.isdir(run.final_dir):
                return run
            if not finished and not cfg.get("finished") and run.latest_checkpoint():
                return run
        return None

    # ---- one process at a time ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """Hold the run folder for this process: a second process gets RunInUseError naming the holder's pid.

        An OS file lock (flock; msvcrt on Windows) on `.lock`: the OS drops it when the holder exits or is
        killed, so a lock left by a dead process is simply taken over. The pid inside is for the message.
        """
        path = os.path.join(self.path, LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if not _try_lock(fd):
                raise RunInUseError(f"{self.path}: run in use by {_lock_holder(path)}; wait until it finishes or "
                                    "stop it (or start a new run with resume = new)")
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()} {socket.gethostname()} {datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n"
                     .encode())
            try:
                yield self
            finally:
                os.ftruncate(fd, 0)
                _unlock(fd)
        finally:
            os.close(fd)

    def remove_leftovers(self) -> list[str]:
        """Delete what a killed save left behind (hidden `.NAME.*.tmp` / `.old` files and folders of atomic
        writes). Call only while holding the lock: another process's write in progress looks the same."""
        removed = []
        for folder in (self.path, self.checkpoints_dir):
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                if name.startswith(".") and name.endswith(".old"):
                    # killed between atomic_folder's two renames: the old copy is the only one; put it back
                    original = os.path.join(folder, name[1:].rsplit(".", 2)[0])
                    if not os.path.lexists(original):
                        os.replace(os.path.join(folder, name), original)
                        continue
                if name.startswith(".") and name.endswith((".tmp", ".old")):
                    target = os.path.join(folder, name)
                    if os.path.isdir(target) and not os.path.islink(target):
                        shutil.rmtree(target, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            os.remove(target)
                    removed.append(target)
        return removed

    # ---- config ------------------------------------------------------------------------------------------------
    @property
    def config_path(self) -> str:
        return os.path.join(self.path, "config.json")

    def read_config(self) -> dict:
        """config.json's object; {} when it cannot be read or holds no object (config_problem says why)."""
        try:
            with open(self.config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            return {}
        return config if isinstance(config, dict) else {}

    def config_problem(self) -> str | None:
        """Why config.json cannot be read as a run's config (a hand edit that broke it, a damaged copy), or None."""
        try:
            with open(self.config_path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            return "config.json is missing"
        except OSError as e:
            return f"config.json cannot be read ({e.strerror or type(e).__name__})"
        except ValueError as e:
            return f"config.json is not JSON ({str(e).splitlines()[0][:120]})"
        return None if isinstance(config, dict) else "config.json does not hold a JSON object"

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.config_path, config)

    def update_config(self, **changes) -> None:
        cfg = self.read_config()
        cfg.update(changes)
        self.write_config(cfg)

    # ---- loss log ----------------------------------------------------------------------------------------------
    @property
    def loss_log(self) -> str:
        return os.path.join(self.path, "loss.jsonl")

    def append_loss(self, record: dict) -> None:
        append_jsonl(self.loss_log, record)

    def read_loss(self) -> list[dict]:
        return read_jsonl(self.loss_log)

    def truncate_loss(self, last_step: int) -> None:
        """Keep the log up to `last_step` (a resumed run re-logs the steps after its checkpoint)."""
        records = [r for r in self.read_loss() if r.get("step", 0) <= last_step]
        with atomic_path_text(self.loss_log) as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    # ---- checkpoints -------------------------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> str:
        return os.path.join(self.path, "checkpoints")

    @property
    def final_dir(self) -> str:
        return os.path.join(self.path, "final")

    @property
    def previews_dir(self) -> str:
        return os.path.join(self.path, "previews")

    def checkpoints(self) -> list[str]:
        """Complete checkpoint folders, by step (numerically: step-10000000 comes after step-9999999)."""
        found = [p for p in glob.glob(os.path.join(self.checkpoints_dir, "step-*")) if os.path.isdir(p)
                 and os.path.exists(os.path.join(p, "state.json")) and os.path.basename(p)[5:].isdigit()]
        return sorted(found, key=lambda p: int(os.path.basename(p)[5:]))

    def latest_checkpoint(self) -> str | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save_checkpoint(self, step: int, write, keep_last: int = 0, keep=()) -> str:
        """`write(folder)` fills a temporary folder; it becomes checkpoints/step-NNNNNN atomically. `keep_last`
        prunes the older ones, except those in `keep` (the best checkpoint)."""
        path = os.path.join(self.checkpoints_dir, f"step-{step:07d}")
        with atomic_folder(path) as tmp:
            write(tmp)
        if keep_last > 0:
            for old in self.checkpoints()[:-keep_last]:
                if old not in keep:
                    shutil.rmtree(old, ignore_errors=True)
        return path

    def save_final(self, write) -> str:
        with atomic_folder(self.final_dir) as tmp:
            write(tmp)
        return self.final_dir


class atomic_path_text:
    """Open a text file for writing that replaces `path` only when closed without error."""

    def __init__(self, path: str):
        from .fsutil import atomic_path

        self._ctx = atomic_path(path)

    def __enter__(self):
        self._tmp = self._ctx.__enter__()
        self._f = open(self._tmp, "w", encoding="utf-8")
        return self._f

    def __exit__(self, *exc):
        self._f.close()
        return self._ctx.__exit__(*exc)


def _try_lock(fd) -> bool:
    try:
        import fcntl
    except ImportError:                       # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _unlock(fd) -> None:
    try:
        import fcntl
    except ImportError:
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)


def _lock_holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            parts = f.read().split()
    except OSError:
        parts = []
    if not parts:
        return "another process"
    where = f" on {parts[1]}" if len(parts) > 1 and parts[1] != socket.gethostname() else ""
    since = f" since {' '.join(parts[2:4])}" if len(parts) >= 4 else ""
    return f"pid {parts[0]}{where}{since}"
