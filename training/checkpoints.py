"""Checkpoints, in one place for the trainer and Imagic alike: *which* one a run continues from (the resume
setting, the newest that loads; the run claimed), *what* one holds, how it is written and applied to the training
state, and the new run folder a run without one starts in. The step loops never open a checkpoint file;
runs.RunFolder owns where folders are and their atomic writes.

A checkpoint folder holds trainable.safetensors (the trained tensors by name), optimizer.pt (optimizer, LR
schedule, fp16 loss scaler), ema.pt (when EMA is on) and state.json (step, run id; Imagic adds its stage).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import time

from .control import TrainingSaveError
from .runs import RUNS_SUBFOLDER, RunFolder, library_versions


# ---- which checkpoint -----------------------------------------------------------------------------------------
def resume_target(output_root, run_id, resume):
    """(RunFolder or None, checkpoint folder or None) for the `resume` setting."""
    if resume in ("new", "", None):
        return None, None
    if resume == "auto":
        run = RunFolder.find(output_root, run_id, finished=False)
        return (run, run.latest_checkpoint()) if run else (None, None)
    path = os.path.abspath(os.path.expanduser(resume))
    if os.path.exists(os.path.join(path, "state.json")):                  # a checkpoint folder
        return RunFolder(os.path.dirname(os.path.dirname(path))), path
    if os.path.exists(os.path.join(path, "config.json")):                 # a run folder: its latest checkpoint
        run = RunFolder(path)
        ckpt = run.latest_checkpoint()
        if ckpt is None:
            raise ValueError(f"resume: {path} has no checkpoint yet; start a new run")
        return run, ckpt
    raise ValueError(f"resume: {resume!r} is neither 'auto', 'new', a run folder nor a checkpoint folder")


def check_resume_folder(resume, processes: int = 1) -> None:
    """A resume setting naming a folder is checked before any work (data preparation writes caches): a path that
    is neither a run nor a checkpoint folder, a run without a checkpoint, or a run trained by another number of
    processes is refused here. Which run `auto` continues depends on the data, so it is decided later."""
    if resume in ("auto", "new", "", None):
        return
    run, _ = resume_target(None, None, resume)
    trained_by = run.read_config().get("processes", 1)
    if trained_by != processes:
        raise ValueError(f"resume: {run.path} was trained by {trained_by} process(es); continue it with the same "
                         f"number (this run has {processes}), or start a new run (resume 'new')")


def unreadable_runs(output_root, run_id) -> list:
    """(RunFolder, why) for each unfinished run under `output_root` whose newest checkpoint belongs to `run_id` but
    which resume auto cannot recognise from its config.json (missing, not JSON, another run id, marked finished
    without final weights: a hand edit or a damaged copy): it says so instead of starting over silently."""
    found = []
    for checkpoints in sorted(glob.glob(os.path.join(output_root, RUNS_SUBFOLDER, "*", "checkpoints"))):
        run = RunFolder(os.path.dirname(checkpoints))
        checkpoint = run.latest_checkpoint()
        if checkpoint is None or os.path.isdir(run.final_dir):
            continue
        try:
            with open(os.path.join(checkpoint, "state.json"), encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(state, dict) or state.get("run_id") != run_id:
            continue
        config = run.read_config()
        problem = run.config_problem()
        if problem is None and config.get("run_id") != run_id:
            problem = f"config.json names another run (run_id {str(config.get('run_id'))[:40]!r})"
        elif problem is None and config.get("finished"):
            problem = "config.json marks it finished though it has no final weights"
        if problem:
            found.append((run, problem))
    return found


def restore_edited_config(run, recorded: dict, say) -> None:
    """A resumed run's config.json must say what is trained: values edited by hand since it was written (the
    settings, the run length) are named and written back as they are trained. `recorded`: those keys as the
    run writes them (its run_id too). Settings a resume may change without changing the weights (previews, saving, speed: not in
    config_hash) are written back without a word."""
    from .settings import settings_fields

    unmentioned = {f"settings.{name}" for name, f in settings_fields().items() if not f.metadata["affects_result"]}
    config = run.read_config()
    edited = []
    for key, value in recorded.items():
        value = json.loads(json.dumps(value))
        old = config.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            edited += [f"{key}.{k}" for k in sorted(set(value) | set(old)) if value.get(k) != old.get(k)]
        elif value != old:
            edited.append(key)
    named = [key for key in edited if key not in unmentioned]
    if named:
        edited = named
        shown = ", ".join(edited[:8]) + (f" and {len(edited) - 8} more" if len(edited) > 8 else "")
        say(f"resume: {run.config_path} was edited since the run wrote it ({shown}); the run continues with the "
            "settings it was started with and config.json records them again (change settings in the workflow: "
            "that starts a new run)")
    if edited:
        run.update_config(**recorded)


def names_a_checkpoint(resume) -> bool:
    """resume is the path of one checkpoint folder (not auto/new or a run folder)."""
    if resume in ("auto", "new", "", None):
        return False
    return os.path.exists(os.path.join(os.path.abspath(os.path.expanduser(resume)), "state.json"))


def first_loadable(run, checkpoint, load, say, fallback, set_aside: bool = True):
    """(load(folder), folder) for `checkpoint`, or (with `fallback`) for the newest older checkpoint of `run` that
    loads when it is damaged (truncated by a full disk, cut by a crash); None when none loads. A checkpoint the
    user named explicitly is not replaced: its damage is an error naming it. Another run's checkpoint
    (CheckpointMismatch) is always an error. A damaged checkpoint passed over is renamed `.step-N.damaged`
    (`set_aside`, the main process): kept for a look, but no longer the newest, so keep_last_checkpoints never
    prunes a good checkpoint in its favour."""
    candidates = [checkpoint]
    if fallback:
        newest = run.checkpoints().index(checkpoint) if checkpoint in run.checkpoints() else 0
        candidates += list(reversed(run.checkpoints()[:newest]))
    for i, folder in enumerate(candidates):
        try:
            value = load(folder)
        except CheckpointMismatch:
            raise
        except Exception as e:         # SafetensorError, UnpicklingError, EOFError, JSON/OS errors: damaged
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if not fallback:
                raise ValueError(f"{folder}: the checkpoint is damaged and cannot be loaded ({reason}); resume "
                                 f"from another checkpoint of {run.path}, or start a new run") from None
            say(f"checkpoint {folder} is damaged ({reason}); trying an older one")
            if set_aside:
                aside = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.damaged")
                if not os.path.exists(aside):
                    with contextlib.suppress(OSError):
                        os.replace(folder, aside)
            continue
        if i:
            say(f"resuming from {folder} instead of the damaged {checkpoint}")
        return value, folder
    return None


def claim_run(run, held, say) -> None:
    """Lock `run` for this process until `held` closes, before anything reads or writes its files, and remove what
    an interrupted save left in it."""
    held.enter_context(run.lock())
    for path in run.remove_leftovers():
        say(f"removed {path} (left by an interrupted save)")


def loadable_checkpoint(run, checkpoint, run_id, resume, say, set_aside: bool = True):
    """(contents, folder) of the checkpoint a run resumes from: `checkpoint` read whole, or when it is damaged the
    newest older one that reads (not when the user named that checkpoint); None when none does (first_loadable)."""
    return first_loadable(run, checkpoint, lambda folder: read_own_checkpoint(folder, run_id), say,
                          fallback=not names_a_checkpoint(resume), set_aside=set_aside)


# ---- what a checkpoint holds: write, read, apply --------------------------------------------------------------
def write_state(folder, named, optimizer, lr_scheduler, ema, state, scaler=None):
    import torch

    save_fp32_safetensors(named, os.path.join(folder, "trainable.safetensors"))
    extra = {"scaler": scaler.state_dict()} if scaler is not None else {}     # fp16: the loss scale and its clock
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), **extra},
               os.path.join(folder, "optimizer.pt"))
    if ema is not None:
        torch.save(ema.state_dict(), os.path.join(folder, "ema.pt"))
    with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)


def save_fp32_safetensors(tensors: dict, path: str) -> None:
    """`tensors` as float32 in a safetensors file (the bytes safetensors' save_file writes for them), converted
    and written one tensor at a time: bf16 trained weights (weights_dtype bf16) never have a float32 copy made
    all at once, which on a CPU run was 4 bytes per trained parameter above the training step's peak (issue
    21.4). Tensors already float32 on the CPU are written from their own memory."""
    import torch

    names = sorted(tensors)
    header, offset = {}, 0
    for name in names:
        t = tensors[name]
        size = t.numel() * 4
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in names:
            t = tensors[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
            f.write(memoryview(t.reshape(-1).numpy()).cast("B"))
            del t


class CheckpointMismatch(ValueError):
    """A readable checkpoint of another run (other settings, data or base model)."""


def read_checkpoint(folder) -> dict:
    """Every file of a checkpoint read into memory (CPU), so a damaged one fails here, before any state changes."""
    import torch
    from safetensors.torch import load_file

    with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    ema_path = os.path.join(folder, "ema.pt")
    return {"state": state, "weights": load_file(os.path.join(folder, "trainable.safetensors")),
            "optimizer": torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=True),
            "ema": torch.load(ema_path, map_location="cpu", weights_only=True) if os.path.exists(ema_path) else None}


def read_own_checkpoint(folder, run_id) -> dict:
    """A checkpoint's contents, read whole; another run's checkpoint is an error (CheckpointMismatch)."""
    ckpt = read_checkpoint(folder)
    if ckpt["state"].get("run_id") != run_id:
        raise CheckpointMismatch(
            f"{folder}: this checkpoint belongs to a run with other settings, data or base model (run id "
            f"{ckpt['state'].get('run_id')} vs {run_id}); start a new run (resume = new) or restore the "
            "original settings")
    return ckpt


def copy_weights(folder, named, saved: dict) -> None:
    """Trainable tensors of a checkpoint into `named` (in place)."""
    import torch

    missing = sorted(set(named) - set(saved))
    if missing:
        raise CheckpointMismatch(f"{folder}: the checkpoint lacks {len(missing)} trained tensors (e.g. "
                                 f"{missing[:2]}); it was made with other settings")
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(saved[k].to(device=p.device, dtype=p.dtype))


def apply_checkpoint(folder, ckpt, named, optimizer, lr_scheduler, ema, scaler=None) -> int:
    """A checkpoint read by read_own_checkpoint into the training state; returns its step."""
    copy_weights(folder, named, ckpt["weights"])
    opt = ckpt["optimizer"]
    optimizer.load_state_dict(opt["optimizer"])
    lr_scheduler.load_state_dict(opt["lr_scheduler"])
    if scaler is not None and opt.get("scaler"):
        scaler.load_state_dict(opt["scaler"])
    if ema is not None and ckpt["ema"] is not None:
        ema.load_state_dict(ckpt["ema"])
    return int(ckpt["state"]["step"])


def load_checkpoint(folder, named, optimizer, lr_scheduler, ema, run_id, scaler=None) -> int:
    return apply_checkpoint(folder, read_own_checkpoint(folder, run_id), named, optimizer, lr_scheduler, ema,
                            scaler)


def load_weights(folder, named) -> dict | None:
    """Trainable tensors into `named` (in place); returns the EMA state if the folder has one."""
    import torch
    from safetensors.torch import load_file

    copy_weights(folder, named, load_file(os.path.join(folder, "trainable.safetensors")))
    ema_path = os.path.join(folder, "ema.pt")
    return torch.load(ema_path, map_location="cpu", weights_only=True) if os.path.exists(ema_path) else None


def save_training_state(run, step: int, state: dict, named, optimizer, lr_scheduler, ema=None, scaler=None, *,
                        final: bool = False, keep_last=None, keep=()) -> str:
    """The training state as the checkpoint of `step` (or, `final`, as the run's final state), written atomically by
    RunFolder; a failed write (a full disk) is a TrainingSaveError naming the previous checkpoint, which is intact."""
    def write(folder):
        write_state(folder, named, optimizer, lr_scheduler, ema, state, scaler=scaler)
    try:
        if final:
            return run.save_final(write)
        return run.save_checkpoint(step, write, keep_last=keep_last, **({"keep": tuple(keep)} if keep else {}))
    except OSError as e:
        raise TrainingSaveError(f"could not save the checkpoint of step {step} in {run.path}: {e}. The previous "
                                f"checkpoint is intact: {run.latest_checkpoint() or 'none yet'}") from e


# ---- a new run folder -----------------------------------------------------------------------------------------
def create_run(output_root, settings, concepts, data, model, run_id, parent_run, total_steps, report, held,
               **extra_config):
    """A new run folder with config.json and dataset_report.txt, locked for this process (`held`); a failure here
    leaves no run folder behind (nothing has started)."""
    run = RunFolder.create(output_root, settings.run_name, {
        "run_id": run_id, "settings": settings.to_dict(), "concepts": [c.to_dict() for c in concepts],
        "dataset_report": data.report.to_dict(), "base_model": {"path": model.source, "hash": model.source_hash,
                                                                "family": model.family,
                                                                "prediction_type": model.prediction_type,
                                                                "parent_run_id": parent_run},
        **extra_config, "libraries": library_versions(), "total_steps": total_steps, "finished": False,
        "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    try:
        held.enter_context(run.lock())
        with open(os.path.join(run.path, "dataset_report.txt"), "w", encoding="utf-8",
                  errors="backslashreplace") as f:
            f.write(_file_names_as_text(report) + "\n")
    except BaseException:
        shutil.rmtree(run.path, ignore_errors=True)     # no run folder for a run that never started
        raise
    return run


def _file_names_as_text(text: str) -> str:
    """`text` with the bytes of non-UTF-8 file names (lone surrogates, as os.listdir gives them) shown as \\xNN
    escapes, so a report naming them can be written as UTF-8."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:         # surrogates that are not escaped bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
