"""TrainDreamBooth: DB_MODEL + CONCEPTS + DB_CONFIG → trained DB_MODEL and its run folder.

The node only adapts: it frees ComfyUI's VRAM, picks ComfyUI's device, feeds ComfyUI's progress bar and the
live panel (nodes/live.py), maps Cancel to a resumable stop, and calls `training.trainer.train`.
"""
from __future__ import annotations

import os
import re

from . import comfy_compat as compat
from .paths import check_path, typed_path

CATEGORY = "DreamBooth"


# Bumped by every requested stop: TrainDreamBooth.IS_CHANGED then differs, so ComfyUI runs the node again on the next
# queue (it would otherwise reuse the stopped run's cached output) and the run resumes.
_stops = [0]


# What the trainer (and Imagic) say when they continue a run: "resuming <run folder> from step <N>[ (Imagic stage S)]"
RESUMING = re.compile(r"^resuming (.+) from step (\d+)(?: \(Imagic stage \d+\))?$")


def resumed_points(run_dir: str, step: int) -> list[list]:
    """[step, loss] of a resumed run up to its checkpoint's step, from its loss log ([] when it cannot be read)."""
    from ..training.runs import RunFolder

    try:
        records = RunFolder(run_dir).read_loss()
    except (OSError, ValueError):
        return []
    return [[r["step"], r["loss"]] for r in records
            if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step and "loss" in r]


def resumed_validation(run_dir: str, step: int) -> list[list]:
    """[step, subject loss] of a resumed run's validations up to its checkpoint's step (the chart's second curve)."""
    from ..training.validation import read_records

    try:
        records = read_records(run_dir)
    except (OSError, ValueError):
        return []
    return [[r["step"], r["loss"]] for r in records
            if isinstance(r, dict) and isinstance(r.get("step"), int) and r["step"] <= step and "loss" in r]


def resume_setting(resume) -> str:
    """auto / new as they are; a run or checkpoint folder made absolute after the folder check (training writes
    there). A relative folder is looked up in the output folder first (where runs are)."""
    text = typed_path(resume) or "auto"
    if text in ("auto", "new"):
        return text
    if not os.path.isabs(text):
        in_output = os.path.join(compat.output_directory(), text)
        text = in_output if os.path.exists(in_output) or not os.path.exists(text) else text
    return check_path(text, "TrainDreamBooth resume", write=True)


def _ui_image(path: str) -> dict:
    root = os.path.realpath(compat.output_directory())
    rel = os.path.relpath(os.path.realpath(path), root)
    sub, name = os.path.split(rel)
    return {"filename": name, "subfolder": sub.replace(os.sep, "/"), "type": "output"}


class TrainDreamBooth:
    """Train DreamBooth (LoRA or full fine-tune). Live loss/previews on the node; Cancel saves a resumable
    checkpoint; a stop from the panel hands on the model it saved (queue again to continue); re-queueing an identical
    graph reuses the finished run instead of training again."""

    DESCRIPTION = __doc__
    CATEGORY = CATEGORY
    RETURN_TYPES = ("DB_MODEL", "STRING", "STRING")
    RETURN_NAMES = ("model", "run_dir", "report")
    OUTPUT_TOOLTIPS = ("The trained model (base + adapters, or fine-tuned weights): feed SampleTrained or a save node.",
                       "The run folder: config.json, loss.jsonl, previews, checkpoints.",
                       "Dataset report and training summary.")
    OUTPUT_NODE = True
    FUNCTION = "train"
    TRAINS = True       # several processes (accelerate launch): every rank runs this node and what it needs

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("DB_MODEL", {"tooltip": "The base model (LoadBaseModel). It is not modified."}),
                "concepts": ("CONCEPTS", {"tooltip": "One or more chained ConceptDataset nodes."}),
                "config": ("DB_CONFIG", {"tooltip": "Training settings (DreamBoothSettings and its chained nodes)."}),
            },
            "optional": {
                "resume": ("STRING", {"default": "auto",
                                      "tooltip": "auto: continue an interrupted run with the same settings, data "
                                                 "and model; new: always start over; or the path of a run folder "
                                                 "or checkpoint folder to continue."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    @classmethod
    def IS_CHANGED(cls, **_inputs):
        return f"stops:{_stops[0]}"

    def train(self, model, concepts, config, resume="auto", unique_id=None, prompt=None):
        from ..training.data.dataset import PreparationStopped
        from ..training.data.report import is_notice
        from ..training.trainer import TrainCallbacks, TrainingInterrupted, train
        from .live import LiveReporter

        check_savers(prompt, unique_id, config)   # a save node that could not save this run: said before any work
        resume = resume_setting(resume)       # before anything else: a refused folder is never touched
        compat.free_comfy_memory()
        reporter = LiveReporter(unique_id if unique_id is not None else "headless",
                                prompt_id=compat.current_prompt_id())   # the panel of the workflow that queued it
        bar = compat.Progress(1, label="training")
        cancelled = []       # the interrupt the progress bar raised (raising it consumed ComfyUI's flag)

        def progress(p):
            reporter.progress(p["step"], p["total"], p["epoch"], p["loss"], p["lr"], p["it_per_s"], p["eta_s"],
                              epochs=p.get("epochs"), stage=p.get("stage"))
            try:
                bar.update_absolute(p["step"], p["total"])
            except Exception as e:   # Cancel: remembered, so the trainer saves and stops at this step boundary
                if not compat.is_interrupt(e):
                    raise
                cancelled.append(e)

        def should_stop():
            return bool(cancelled) or compat.interrupt_requested()

        activity = ["preparing the data"]   # the trainer's latest stage line ("caching latents (disk)", ...)

        def log(message):
            compat.log(message)
            resuming = RESUMING.match(message)
            if resuming:                     # the chart starts at step 1: the run's loss so far
                reporter.resumed(resumed_points(resuming.group(1), int(resuming.group(2))))
                for point in resumed_validation(resuming.group(1), int(resuming.group(2))):
                    reporter.validation(*point)
            if not is_notice(message):       # problem files are printed and reported, not stages
                activity[0] = message
                reporter.stage(message)

        def stage(name, done, total):
            reporter.stage(f"{activity[0]}: {done}/{total}")

        def preview(paths):
            reporter.preview([_ui_image(p) for p in paths])

        def validation(record):             # the panel's second curve: the subject loss of each validation
            reporter.validation(record["step"], record["loss"])

        callbacks = TrainCallbacks(progress=progress, preview=preview, log=log, should_stop=should_stop,
                                   control=reporter.trainer_control, stage=stage, validation=validation)
        try:
            result = train(model, concepts, config, output_root=compat.output_directory(), resume=resume,
                           device=compat.comfy_torch_device(), callbacks=callbacks)
        except (TrainingInterrupted, PreparationStopped) as e:
            if cancelled or compat.interrupt_requested():     # ComfyUI Cancel / Ctrl-C: ComfyUI's own interrupt
                reporter.status("interrupted", str(e))
                if cancelled:
                    raise cancelled[0] from None
                compat.check_interrupt()
            _stops[0] += 1
            result = getattr(e, "result", None)
            if result is None:     # stopped before the first step: nothing to hand on; ends like Cancel, no error
                reporter.status("stopped", "stopped before training started (nothing trained)")
                raise compat.interrupt_exception(f"{e}. Queue the graph again to continue (resume = auto).") from None
            compat.log(str(e))      # names the checkpoint
            stopped = True
        except Exception as e:
            reporter.status("error", str(e))
            raise
        else:
            stopped = False
        finally:
            bar.close()
            compat.release_training_memory()   # optimizer states, activations and copies are gone by now
        if stopped:     # a requested stop: the checkpoint's model goes on to the next nodes, the run stays resumable
            return self._stopped_output(result, reporter)
        reporter.run_dir = result.run_dir
        reporter.status("done", ("reused finished run " if result.reused else "finished ") + result.run_dir)
        summary = (f"{'Reused' if result.reused else 'Trained'} {result.steps} steps; final loss "
                   f"{result.final_loss if result.final_loss is not None else '-'}\nrun: {result.run_dir}\n\n{result.report}")
        return self._output(result, summary)

    @staticmethod
    def _stopped_output(result, reporter) -> dict:
        reporter.run_dir = result.run_dir
        reporter.status("stopped", stopped_message(result.steps))
        loss = result.final_loss if result.final_loss is not None else "-"
        summary = (f"{stopped_message(result.steps).capitalize()}; loss {loss}\nrun: {result.run_dir}\n"
                   f"Queue the graph again to continue it (resume = auto).\n\n{result.report}")
        return TrainDreamBooth._output(result, summary)

    @staticmethod
    def _output(result, summary: str) -> dict:
        folder = os.path.join(result.run_dir, "previews")
        previews = sorted(os.path.join(folder, f) for f in os.listdir(folder))[-8:] if os.path.isdir(folder) else []
        return {"ui": {"text": [summary], "images": [_ui_image(p) for p in previews]},
                "result": (result.model, result.run_dir, summary)}


def lora_savers(prompt, node_id) -> list[str]:
    """The SaveLoRA nodes of the graph `prompt` (API format) fed by the model output of node `node_id`, each as
    "SaveLoRA (node N, 'title')"."""
    if not isinstance(prompt, dict) or node_id is None:
        return []
    found = []
    for saver_id, node in prompt.items():
        if not isinstance(node, dict) or node.get("class_type") != "SaveLoRA":
            continue
        link = (node.get("inputs") or {}).get("model")
        if isinstance(link, list) and len(link) == 2 and str(link[0]) == str(node_id) and link[1] == 0:
            title = (node.get("_meta") or {}).get("title")
            found.append(f"SaveLoRA (node {saver_id}" + (f", '{title}')" if title else ")"))
    return found


def check_savers(prompt, node_id, config) -> None:
    """A SaveLoRA after a full fine-tune would fail only after the whole run ("no LoRA adapters"): refused here,
    before any work, naming the save node, the setting and the fixes."""
    savers = lora_savers(prompt, node_id) if not getattr(config, "use_lora", True) else []
    if savers:
        raise ValueError(f"{', '.join(savers)} saves LoRA adapters, but this TrainDreamBooth node's config trains a "
                         "full fine-tune (use_lora off), which has none: nothing was trained. Turn use_lora on (on "
                         "DreamBooth Settings; a PerformanceWizard keeps a connected use_lora, mode lora forces it), "
                         "or save the model with SaveCheckpoint or SaveDiffusers")


def stopped_message(step: int) -> str:
    """What the panel and the node's text say about a run stopped on request."""
    return f"stopped at step {step} (checkpoint saved)"


NODE_CLASS_MAPPINGS = {"TrainDreamBooth": TrainDreamBooth}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainDreamBooth": "DreamBooth Train"}
