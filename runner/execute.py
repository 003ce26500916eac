"""Execution: run a validated workflow node by node as ComfyUI's executor does; Ctrl-C; run_workflow()."""
from __future__ import annotations

import contextlib
import inspect
import os
import signal
import sys
import threading
import time
from typing import Any, Iterable, Mapping, TextIO

from ..nodes import comfy_compat
from ..training.distributed import SUPERVISOR_ENV, process_info, register_with_supervisor
from .errors import NodeExecutionError, WorkflowError, WorkflowInterrupted
from .formats import prepare_workflow
from .specs import PreparedWorkflow, hidden_values, input_spec, input_types, is_link, node_title, runner_package, shorten
from .validation import validate_workflow

OUTPUT_ROOM_BYTES = 1024     # for run folders, checkpoints and saved models inside the output folder


def _gather_inputs(node_id: str, prepared: PreparedWorkflow, types: dict, outputs: dict) -> dict:
    """Each input as a list of values, as ComfyUI's get_input_data does (a linked input is its producer's list)."""
    gathered = {}
    for name, value in prepared.prompt[node_id]["inputs"].items():
        _, category, options = input_spec(types, name)
        if is_link(value) and not options.get("rawLink"):
            gathered[name] = outputs[str(value[0])][value[1]]
        elif category is not None:
            gathered[name] = [value]
    for name, value in hidden_values(types, node_id, prepared).items():
        gathered[name] = [value]
    return gathered


def _call_over_lists(obj: Any, function_name: str, gathered: dict) -> list:
    """ComfyUI's _map_node_over_list: one call per list element (shorter lists repeat their last item)."""
    fn = getattr(obj, function_name)

    def call(kwargs):
        result = fn(**kwargs)
        if inspect.isawaitable(result):
            import asyncio
            result = asyncio.run(_await(result))
        return result

    if getattr(obj, "INPUT_IS_LIST", False):
        return [call(gathered)]
    length = max((len(v) for v in gathered.values()), default=0)
    if length == 0:
        return [call({})]
    return [call({k: v[i if len(v) > i else -1] for k, v in gathered.items()}) for i in range(length)]


async def _await(awaitable):
    return await awaitable


def _merge_returns(returns: list, cls: type, label: str) -> tuple[list, dict]:
    """ComfyUI's get_output_from_returns + merge_result_data: per-output lists and the merged ui dict."""
    return_types = tuple(getattr(cls, "RETURN_TYPES", ()) or ())
    results, uis = [], []
    for value in returns:
        if isinstance(value, dict):
            if "expand" in value:
                raise WorkflowError(f"{label} returned a node expansion ('expand'), which only ComfyUI can run")
            if "ui" in value and value["ui"] is not None:
                uis.append(value["ui"])
            if "result" in value:
                results.append(tuple(value["result"] or ()))
            continue
        if value is None:
            value = ()
        if not isinstance(value, (tuple, list)):
            raise WorkflowError(f"{label} returned a {type(value).__name__}; a node function must return a tuple "
                                f"(or a dict with 'ui' / 'result')")
        results.append(tuple(value))
    for result in results:
        if len(result) < len(return_types):
            raise WorkflowError(f"{label} returned {len(result)} value(s) but declares {len(return_types)} "
                                f"RETURN_TYPES {return_types}")
    output = []
    if results:
        output_is_list = tuple(getattr(cls, "OUTPUT_IS_LIST", ()) or ())
        for i in range(len(results[0])):
            if i < len(output_is_list) and output_is_list[i]:
                output.append([item for r in results for item in r[i]])
            else:
                output.append([r[i] for r in results])
    ui = {}
    if uis:
        ui = {k: [item for u in uis for item in (u.get(k) or [])] for k in uis[0]}
    return output, ui


def _inference_mode(enabled: bool):
    """ComfyUI runs every prompt under torch.inference_mode(); do the same so nodes behave identically."""
    if not enabled:
        return contextlib.nullcontext()
    try:
        import torch
    except ImportError:
        return contextlib.nullcontext()
    return torch.inference_mode()


def execute_workflow(prepared: PreparedWorkflow, node_classes: Mapping[str, type], order: list[str] | None = None,
                     stream: TextIO | None = None, inference_mode: bool = True) -> dict:
    """Run a validated workflow; returns the result dict (see run_workflow)."""
    order = validate_workflow(prepared, node_classes) if order is None else order
    outputs: dict[str, list] = {}
    result = {"status": "running", "format": prepared.format, "executed": [], "outputs": {}, "results": outputs,
              "timings": {}, "prompt": prepared.prompt}
    current = None
    with _inference_mode(inference_mode):
        for position, node_id in enumerate(order, 1):
            node = prepared.prompt[node_id]
            class_type = node["class_type"]
            cls = node_classes[class_type]
            current = node_id
            label = f"node {node_id}" + (f" '{node_title(node)}'" if node_title(node) != class_type else "") + f" ({class_type})"
            try:
                comfy_compat.check_interrupt()
                _say(stream, f"[{position}/{len(order)}] {label}")
                started = time.monotonic()
                types = input_types(cls, class_type)
                returns = _call_over_lists(cls(), getattr(cls, "FUNCTION"), _gather_inputs(node_id, prepared, types, outputs))
                node_outputs, ui = _merge_returns(returns, cls, label)
            except WorkflowError:
                raise
            except Exception as exc:
                if comfy_compat.is_interrupt(exc):
                    result["status"] = "interrupted"
                    raise WorkflowInterrupted(current, result) from exc
                raise NodeExecutionError(node_id, class_type, node_title(node), exc) from exc
            outputs[node_id] = node_outputs
            if ui:
                result["outputs"][node_id] = ui
            result["executed"].append(node_id)
            result["timings"][node_id] = round(time.monotonic() - started, 3)
    result["status"] = "success"
    return result


def _say(stream: TextIO | None, line: str) -> None:
    if stream is None:
        return
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def _ctrl_c_interrupts(stream: TextIO | None, quiet: bool = False):
    """First Ctrl-C asks the running node to stop at its next check; the second aborts at once (`quiet`: without
    saying so: another process speaks for this one). SIGTERM is a first Ctrl-C (training saves a checkpoint); a
    second signal aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    presses = [0]

    def on_sigint(signum, frame):
        presses[0] += 1
        if presses[0] == 1:
            comfy_compat.request_interrupt()
            if not quiet:
                _say(stream if stream is not None else sys.stderr,
                     "\ninterrupt requested: stopping at the next check (press Ctrl-C again to abort now)")
            return
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt

    def on_sigterm(signum, frame):          # a scheduler's or a launcher's stop: as the first Ctrl-C (a checkpoint)
        terms[0] += 1
        if terms[0] == 1 and presses[0] == 0:
            presses[0] = 1
            comfy_compat.request_interrupt()
            if not quiet:
                _say(stream if stream is not None else sys.stderr,
                     "\nterminate requested: stopping at the next check (training saves a checkpoint)")
            return
        raise KeyboardInterrupt

    terms = [0]
    previous_term = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)


@contextlib.contextmanager
def _registered(rank: int, register: bool):
    """Several processes launched by `run --num-processes`: the command learns this process's pid once Ctrl-C is
    handled here (it passes presses on to it), and forgets it when the run ends (a later press must not reach
    another process that reuses the pid)."""
    path = register_with_supervisor(rank) if register else None
    try:
        yield
    finally:
        if path:
            with contextlib.suppress(OSError):
                os.remove(path)


def run_workflow(workflow: dict | str | os.PathLike, *, overrides: Iterable[str] = (),
                 output_dir: str | os.PathLike = "output", node_classes: Mapping[str, type] | None = None,
                 display_names: Mapping[str, str] | None = None, show_progress: bool = True,
                 stream: TextIO | None = None, handle_ctrl_c: bool = True, inference_mode: bool = True) -> dict:
    """Read, convert, override, validate and execute a workflow headless.

    Returns {"status": "success", "format", "output_dir", "executed": [node ids in order],
    "outputs": {node id: ui dict (e.g. {"images": [{"filename", "subfolder", "type"}]})},
    "results": {node id: [one list per output, as ComfyUI stores them]}, "timings": {node id: seconds}, "prompt"}.
    Raises WorkflowError subclasses (one clear line each); WorkflowInterrupted carries the partial result.
    """
    node_classes = runner_package().pack_node_classes() if node_classes is None else node_classes
    stream = (stream if stream is not None else sys.stderr) if show_progress else None
    output_dir = _checked_output_dir(output_dir)
    # set before reading the graph: INPUT_TYPES lists models from <output>/checkpoints etc., and validation checks
    # combo values against those lists
    comfy_compat.clear_interrupt()
    try:
        with comfy_compat.using_output_directory(output_dir):
            prepared = prepare_workflow(workflow, node_classes, display_names, overrides)
            order = validate_workflow(prepared, node_classes)
            rank, processes = process_info()
            if processes > 1 and rank > 0:     # several processes: the others train alongside rank 0, nothing else
                order = training_share(prepared, node_classes, order)
                stream = None
            os.makedirs(output_dir, exist_ok=True)
            # several processes: one voice (rank 0, or the `run --num-processes` command that launched them)
            quiet = processes > 1 and (rank > 0 or bool(os.environ.get(SUPERVISOR_ENV)))
            guard = _ctrl_c_interrupts(stream, quiet) if handle_ctrl_c else contextlib.nullcontext()
            with guard, _registered(rank, processes > 1 and handle_ctrl_c):
                result = execute_workflow(prepared, node_classes, order, stream=stream, inference_mode=inference_mode)
    except WorkflowInterrupted as exc:
        exc.result["output_dir"] = output_dir
        raise
    finally:
        comfy_compat.clear_interrupt()
    result["output_dir"] = output_dir
    return result


def training_share(prepared: PreparedWorkflow, node_classes: Mapping[str, type], order: list[str]) -> list[str]:
    """The nodes a process other than rank 0 runs: the training nodes (class attribute TRAINS) and what they
    need. Saving, sampling and previews happen once, in rank 0."""
    prompt = prepared.prompt
    needed: set[str] = set()
    todo = [n for n in order if getattr(node_classes[prompt[n]["class_type"]], "TRAINS", False)]
    while todo:
        node_id = todo.pop()
        if node_id in needed:
            continue
        needed.add(node_id)
        todo += [str(v[0]) for v in prompt[node_id]["inputs"].values() if is_link(v)]
    return [n for n in order if n in needed]


def _checked_output_dir(output_dir: str | os.PathLike) -> str:
    """The output folder as an absolute path; WorkflowError for '' (it silently meant the current folder) and for
    a path the file system would refuse as too long (os.makedirs recursed past Python's limit on one)."""
    from ..training.export.naming import path_length_problem

    text = os.fspath(output_dir)
    if not str(text).strip():
        raise WorkflowError("the output folder is empty; name a folder (it is created when missing)")
    problem = path_length_problem(text, room=OUTPUT_ROOM_BYTES)
    if problem:
        raise WorkflowError(f"output folder {shorten(str(text))}: {problem}, leaving room for the files saved "
                            f"inside it; choose a shorter path")
    return os.path.abspath(text)


def saved_files(result: dict) -> list[str]:
    """Paths of the files output nodes reported in their ui (images, ...), under the run's output dir."""
    paths = []
    for ui in (result.get("outputs") or {}).values():
        for items in ui.values():
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item and item.get("type", "output") == "output":
                    paths.append(os.path.join(result.get("output_dir", ""), item.get("subfolder") or "",
                                              item["filename"]))
    return paths
