"""Headless workflow runner: execute a ComfyUI workflow made of this pack's nodes without ComfyUI.

    result = run_workflow("train.json", overrides=["Trainer.steps=50"], output_dir="out")

The same node classes ComfyUI loads are executed the way ComfyUI's executor does (execution.py, 0.3.64):
  * API format ({"id": {"class_type", "inputs"}}, or {"prompt": {...}} as POSTed to /prompt) runs as is;
    canvas format (the saved workflow: nodes/links/widgets_values) is converted first, mapping widget values through
    each class's INPUT_TYPES order (seed "control_after_generate" values, widgets converted to sockets,
    PrimitiveNode, Reroute, Note/MarkdownNote, muted (mode 2) and bypassed (mode 4) nodes);
  * validation like /prompt's: required inputs, link types against the producer's RETURN_TYPES, INT/FLOAT min/max,
    combo options, BOOLEAN/STRING values, VALIDATE_INPUTS; every problem is collected, not just the first;
  * only output nodes (OUTPUT_NODE = True) and what they depend on run, each node once, in dependency order; outputs
    travel as ComfyUI's per-output lists, so INPUT_IS_LIST / OUTPUT_IS_LIST behave as in ComfyUI;
  * hidden inputs: unique_id (the node id), prompt (the API graph), extra_pnginfo ({"workflow": canvas} when the
    file was a canvas); everything runs under torch.inference_mode(), as ComfyUI does.
Not supported (ComfyUI-only features): subgraphs / group nodes, node expansion ("expand" results), lazy-input
skipping (lazy inputs are always evaluated), caching between runs.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, TextIO

from .nodes import comfy_compat

FRONTEND_ONLY_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_AFTER_GENERATE_VALUES = {"fixed", "increment", "decrement", "randomize", "increment-wrap"}
UPLOAD_WIDGET_VALUES = {"image", "upload", "video", "audio"}
MODE_MUTED, MODE_BYPASSED = 2, 4
COMBO_LIST_SHOWN = 20        # longer option lists are summarised in messages (ComfyUI does the same)


# ------------------------------------------------------------------------------------------------------------------
# Errors: each one reads well as a single line after "error: <file>: "
# ------------------------------------------------------------------------------------------------------------------
class WorkflowError(Exception):
    """Base of every problem the runner reports; str() is one clear line."""


class WorkflowFormatError(WorkflowError):
    """Not a readable workflow (bad JSON, neither API nor canvas format, unsupported feature)."""


class CoreNodesError(WorkflowError):
    def __init__(self, class_types: dict[str, list[str]]):
        self.class_types = class_types
        names = ", ".join(f"{t} (node {', '.join(ids)})" for t, ids in sorted(class_types.items()))
        super().__init__(f"this graph uses ComfyUI core nodes (or other packs' nodes) that the headless runner "
                         f"does not have: {names}; run it inside ComfyUI or remove them")


class OverrideError(WorkflowError):
    """A --set that names no node, an ambiguous title, or an input the node does not have."""


@dataclass
class ValidationIssue:
    node_id: str | None
    message: str
    title: str = ""
    class_type: str = ""
    input_name: str | None = None

    def __str__(self) -> str:
        if self.node_id is None:
            return self.message
        where = f"node {self.node_id}"
        if self.title and self.title != self.class_type:
            where += f" '{self.title}'"
        if self.class_type:
            where += f" ({self.class_type})"
        if self.input_name:
            where += f" input '{self.input_name}'"
        return f"{where}: {self.message}"


class WorkflowValidationError(WorkflowError):
    def __init__(self, issues: list[ValidationIssue]):
        self.issues = issues
        count = f"{len(issues)} validation error{'s' if len(issues) != 1 else ''}"
        super().__init__(f"{count}: " + "; ".join(str(i) for i in issues))


class NodeExecutionError(WorkflowError):
    def __init__(self, node_id: str, class_type: str, title: str, error: BaseException):
        self.node_id, self.class_type, self.title, self.error = node_id, class_type, title, error
        label = f"node {node_id}" + (f" '{title}'" if title and title != class_type else "") + f" ({class_type})"
        super().__init__(f"{label} failed: {type(error).__name__}: {error}")


class WorkflowInterrupted(WorkflowError):
    def __init__(self, node_id: str | None, result: dict):
        self.node_id, self.result = node_id, result
        super().__init__("interrupted" + (f" while running node {node_id}" if node_id else ""))


# ------------------------------------------------------------------------------------------------------------------
# Node classes and their input specs
# ------------------------------------------------------------------------------------------------------------------
def pack_node_classes() -> dict[str, type]:
    """This pack's NODE_CLASS_MAPPINGS (kept by the package root __init__.py)."""
    return dict(getattr(importlib.import_module(__package__), "NODE_CLASS_MAPPINGS", {}) or {})


def pack_display_names() -> dict[str, str]:
    return dict(getattr(importlib.import_module(__package__), "NODE_DISPLAY_NAME_MAPPINGS", {}) or {})


def _input_types(cls: type, class_type: str) -> dict:
    try:
        types = cls.INPUT_TYPES()
    except Exception as exc:      # a node bug: report it as such, not as a user error in the graph
        raise WorkflowError(f"{class_type}.INPUT_TYPES() raised {type(exc).__name__}: {exc}") from exc
    return types if isinstance(types, dict) else {}


def _spec_parts(spec: Any) -> tuple[Any, dict]:
    """(type, options) of one INPUT_TYPES entry such as ("INT", {"min": 1}) or (["a", "b"],)."""
    if isinstance(spec, (tuple, list)) and spec:
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        return spec[0], options
    return spec, {}


def _input_spec(types: dict, name: str) -> tuple[Any, str | None, dict]:
    """(type, "required"|"optional"|"hidden", options) of input `name`, or (None, None, {})."""
    for category in ("required", "optional", "hidden"):
        section = types.get(category) or {}
        if name in section:
            input_type, options = _spec_parts(section[name])
            return input_type, category, options
    return None, None, {}


def _declared_inputs(types: dict) -> list[tuple[str, Any, dict, bool]]:
    """(name, type, options, required) for every required then optional input, in INPUT_TYPES order."""
    out = []
    for category in ("required", "optional"):
        for name, spec in (types.get(category) or {}).items():
            input_type, options = _spec_parts(spec)
            out.append((name, input_type, options, category == "required"))
    return out


def _combo_options(input_type: Any, options: dict) -> list | None:
    if isinstance(input_type, (list, tuple)):
        return list(input_type)
    if input_type == "COMBO":
        return list(options.get("options") or [])
    return None


def _is_widget(input_type: Any, options: dict) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(input_type, (list, tuple)) or input_type in WIDGET_TYPES


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) \
        and isinstance(value[1], int) and not isinstance(value[1], bool)


def _sort_ids(ids: Iterable[str]) -> list[str]:
    """Numeric ids in numeric order ("2" before "10"), others after, alphabetically."""
    return sorted(ids, key=lambda i: (0, int(i), "") if str(i).isdigit() else (1, 0, str(i)))


# ------------------------------------------------------------------------------------------------------------------
# Reading a workflow and converting a canvas to API format
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class PreparedWorkflow:
    prompt: dict                          # API format: {"id": {"class_type", "inputs", "_meta": {"title"}}}
    format: str                           # "api" | "canvas"
    source: str = ""                      # file it came from ("" for a dict)
    extra_pnginfo: dict | None = None     # handed to nodes' EXTRA_PNGINFO hidden input
    # canvas PrimitiveNode id / title -> the (node id, input) pairs it feeds, so --set can target the primitive
    primitive_targets: dict | None = None
    # (node id, input) -> why a canvas link was dropped (muted source...), to explain "required input is missing"
    dropped_links: dict | None = None


def read_workflow_file(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise WorkflowFormatError("workflow file not found") from None
    except IsADirectoryError:
        raise WorkflowFormatError("is a folder, expected a workflow .json file") from None
    except json.JSONDecodeError as exc:
        raise WorkflowFormatError(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise WorkflowFormatError("not a text (UTF-8) JSON file") from None
    if not isinstance(data, dict):
        raise WorkflowFormatError(f"expected a JSON object, found a {type(data).__name__}")
    return data


def workflow_format(data: dict) -> str:
    if isinstance(data.get("nodes"), list) and "links" in data:
        return "canvas"
    prompt = data.get("prompt") if isinstance(data.get("prompt"), dict) else data
    if prompt and all(isinstance(v, dict) and "class_type" in v for v in prompt.values()):
        return "api"
    if not prompt:
        raise WorkflowFormatError("the workflow is empty")
    raise WorkflowFormatError("neither an API-format prompt ({\"id\": {\"class_type\", \"inputs\"}}) "
                              "nor a saved canvas workflow ({\"nodes\": [...], \"links\": [...]})")


def _canvas_links(canvas: dict) -> dict:
    """link id -> (origin node id, origin slot, type)."""
    links = {}
    for link in canvas.get("links") or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("type"))
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            links[link[0]] = (link[1], link[2], link[5] if len(link) > 5 else None)
    return links


def _check_node_types(class_types: dict[str, list[str]], node_classes: Mapping[str, type]) -> None:
    missing = {t: ids for t, ids in class_types.items() if t not in node_classes}
    if missing:
        raise CoreNodesError(missing)


def canvas_to_api(canvas: dict, node_classes: Mapping[str, type],
                  display_names: Mapping[str, str] | None = None) -> PreparedWorkflow:
    """Convert a saved canvas workflow to API format, as ComfyUI's frontend does when you press Queue."""
    if (canvas.get("definitions") or {}).get("subgraphs"):
        raise WorkflowFormatError("the workflow uses subgraphs, which the headless runner does not support; "
                                  "unpack them in ComfyUI (right-click > Unpack Subgraph) and save again")
    display_names = display_names or {}
    nodes = {}
    for node in canvas.get("nodes") or []:
        if not isinstance(node, dict) or "id" not in node or "type" not in node:
            raise WorkflowFormatError(f"canvas node without id/type: {str(node)[:80]}")
        nodes[node["id"]] = node
    links = _canvas_links(canvas)
    active = [n for n in nodes.values()
              if n["type"] not in FRONTEND_ONLY_NODES and n.get("mode", 0) not in (MODE_MUTED, MODE_BYPASSED)]
    used_types: dict[str, list[str]] = {}
    for node in active:
        used_types.setdefault(node["type"], []).append(str(node["id"]))
    _check_node_types(used_types, node_classes)

    def resolve(link_id, depth=0):
        """Follow a link to its real source: ("link", [id, slot]) / ("literal", value, primitive) / ("dropped", why)."""
        if link_id is None or link_id not in links or depth > 100:
            return ("dropped", "its link is broken")
        origin_id, origin_slot, link_type = links[link_id]
        source = nodes.get(origin_id)
        if source is None:
            return ("dropped", f"its link comes from node {origin_id}, which is not in the workflow")
        if source["type"] == "Reroute":
            inputs = source.get("inputs") or []
            return resolve(inputs[0].get("link") if inputs else None, depth + 1)
        if source["type"] == "PrimitiveNode":
            values = source.get("widgets_values") or [None]
            return ("literal", values[0], source)
        mode = source.get("mode", 0)
        if mode == MODE_BYPASSED:      # pass through the first linked input of the output's type
            outputs = source.get("outputs") or []
            out_type = (outputs[origin_slot] or {}).get("type", link_type) if origin_slot < len(outputs) else link_type
            for inp in source.get("inputs") or []:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return resolve(inp["link"], depth + 1)
            return ("dropped", f"its link comes from bypassed node {origin_id}, which has no {out_type} input to pass on")
        if mode == MODE_MUTED:
            return ("dropped", f"its link comes from muted node {origin_id}")
        return ("link", [str(origin_id), origin_slot])

    prompt, primitive_targets, dropped = {}, {}, {}
    for node in sorted(active, key=lambda n: (0, n["id"]) if isinstance(n["id"], int) else (1, str(n["id"]))):
        node_id, class_type = str(node["id"]), node["type"]
        types = _input_types(node_classes[class_type], class_type)
        inputs = _widget_values_to_inputs(node.get("widgets_values"), types)
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            source = resolve(inp["link"])
            if source[0] == "link":
                inputs[name] = source[1]
            elif source[0] == "literal":
                inputs[name] = source[1]
                primitive = source[2]
                for key in {str(primitive["id"]), primitive.get("title")} - {None, ""}:
                    primitive_targets.setdefault(key, []).append((node_id, name))
            else:
                inputs.pop(name, None)
                dropped[(node_id, name)] = source[1]
        title = node.get("title") or display_names.get(class_type) or class_type
        prompt[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
    return PreparedWorkflow(prompt=prompt, format="canvas", extra_pnginfo={"workflow": canvas},
                            primitive_targets=primitive_targets, dropped_links=dropped)


def _widget_values_to_inputs(widgets_values: Any, types: dict) -> dict:
    """Map a canvas node's positional widgets_values onto input names (the frontend's widget order)."""
    inputs: dict = {}
    if isinstance(widgets_values, dict):        # some nodes save their widgets by name
        inputs.update(widgets_values)
    else:
        values = list(widgets_values or [])
        i = 0
        for name, input_type, options, _ in _declared_inputs(types):
            if not _is_widget(input_type, options):
                continue
            if i >= len(values):
                break
            inputs[name] = values[i]
            i += 1
            # INT seed widgets carry an extra "control_after_generate" value (old saves: a bool); like the frontend,
            # an explicit control_after_generate option wins over the seed/noise_seed name rule
            if options.get("control_after_generate", name in ("seed", "noise_seed")) and input_type == "INT" \
                    and i < len(values) \
                    and (isinstance(values[i], bool) or values[i] in CONTROL_AFTER_GENERATE_VALUES):
                i += 1
            # upload combos carry an extra "upload" button value
            if (options.get("image_upload") or options.get("video_upload") or options.get("audio_upload")) \
                    and i < len(values) and values[i] in UPLOAD_WIDGET_VALUES:
                i += 1
    # widgets the file did not save: their defaults, as the frontend would show them
    for name, input_type, options, required in _declared_inputs(types):
        if name in inputs or not required or not _is_widget(input_type, options):
            continue
        combo = _combo_options(input_type, options)
        if "default" in options:
            inputs[name] = options["default"]
        elif combo:
            inputs[name] = combo[0]
    return inputs


def prepare_workflow(workflow: dict | str | os.PathLike, node_classes: Mapping[str, type] | None = None,
                     display_names: Mapping[str, str] | None = None,
                     overrides: Iterable[str] = ()) -> PreparedWorkflow:
    """Read (path or dict), convert to API format, check node types, apply --set overrides."""
    node_classes = pack_node_classes() if node_classes is None else node_classes
    display_names = pack_display_names() if display_names is None else display_names
    source = ""
    if isinstance(workflow, (str, os.PathLike)):
        source = os.fspath(workflow)
        workflow = read_workflow_file(source)
    fmt = workflow_format(workflow)
    if fmt == "canvas":
        prepared = canvas_to_api(workflow, node_classes, display_names)
    else:
        raw = workflow["prompt"] if isinstance(workflow.get("prompt"), dict) else workflow
        extra = (workflow.get("extra_data") or {}).get("extra_pnginfo") if raw is not workflow else None
        prompt = json.loads(json.dumps(raw))       # private copy: validation converts values in place
        used_types: dict[str, list[str]] = {}
        for node_id, node in prompt.items():
            used_types.setdefault(node["class_type"], []).append(str(node_id))
        _check_node_types(used_types, node_classes)
        prepared = PreparedWorkflow(prompt=prompt, format="api", extra_pnginfo=extra)
    prepared.source = source
    apply_overrides(prepared, overrides, node_classes)
    return prepared


# ------------------------------------------------------------------------------------------------------------------
# --set overrides
# ------------------------------------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[str, str, Any]:
    """"Title.input=value" -> (target, input, value); value is JSON when it parses, else the raw string."""
    if "=" not in text:
        raise OverrideError(f"--set {text!r}: expected NodeTitleOrId.input=value")
    left, raw_value = text.split("=", 1)
    if "." not in left:
        raise OverrideError(f"--set {text!r}: expected NodeTitleOrId.input=value (no '.' before '=')")
    target, input_name = left.rsplit(".", 1)      # titles may contain dots, input names do not
    target, input_name = target.strip(), input_name.strip()
    if not target or not input_name:
        raise OverrideError(f"--set {text!r}: expected NodeTitleOrId.input=value")
    try:
        value = json.loads(raw_value)
    except json.JSONDecodeError:
        value = raw_value
    return target, input_name, value


def _title(node: dict) -> str:
    return (node.get("_meta") or {}).get("title") or node.get("class_type", "")


def _override_targets(prepared: PreparedWorkflow, target: str, input_name: str, text: str) -> list[tuple[str, str]]:
    prompt = prepared.prompt
    if target in prompt:
        return [(target, input_name)]
    primitives = prepared.primitive_targets or {}
    if target in primitives:
        return list(primitives[target])
    explicit_title = lambda n: (n.get("_meta") or {}).get("title")
    for key, label in ((explicit_title, "title"), (lambda n: n.get("class_type"), "node type")):
        matches = _sort_ids(i for i, n in prompt.items() if key(n) == target)
        if len(matches) == 1:
            return [(matches[0], input_name)]
        if len(matches) > 1:
            raise OverrideError(f"--set {text!r}: {label} {target!r} matches nodes {', '.join(matches)}; "
                                f"use the node id instead")
    known = ", ".join(f"{i} '{_title(prompt[i])}'" for i in _sort_ids(prompt))
    raise OverrideError(f"--set {text!r}: no node with id or title {target!r} (nodes: {known})")


def apply_overrides(prepared: PreparedWorkflow, overrides: Iterable[str], node_classes: Mapping[str, type]) -> None:
    for text in overrides or ():
        target, input_name, value = parse_override(text)
        for node_id, name in _override_targets(prepared, target, input_name, text):
            node = prepared.prompt[node_id]
            if target in (prepared.primitive_targets or {}) and target not in prepared.prompt \
                    and input_name not in ("value", name):
                raise OverrideError(f"--set {text!r}: a primitive node has one input, 'value'")
            class_type = node["class_type"]
            types = _input_types(node_classes[class_type], class_type)
            declared = [n for n, *_ in _declared_inputs(types)]
            if name not in declared:
                raise OverrideError(f"--set {text!r}: node {node_id} ({class_type}) has no input {name!r}; "
                                    f"its inputs are {', '.join(declared) or '(none)'}")
            node["inputs"][name] = value


# ------------------------------------------------------------------------------------------------------------------
# Validation (what ComfyUI's /prompt checks), collecting every problem
# ------------------------------------------------------------------------------------------------------------------
def _types_match(received: Any, expected: Any) -> bool:
    """ComfyUI's validate_node_input (comma unions overlap) plus "*" = any and COMBO producers for combo inputs."""
    if received == expected:
        return True
    if isinstance(expected, (list, tuple)):          # a combo input fed by a link
        return isinstance(received, (list, tuple)) or received in ("COMBO", "*")
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    received_set = {t.strip() for t in received.split(",")}
    expected_set = {t.strip() for t in expected.split(",")}
    return "*" in received_set or "*" in expected_set or bool(received_set & expected_set)


def _convert_constant(input_type: Any, value: Any) -> Any:
    """Convert a widget value the way ComfyUI does (slightly stricter); ValueError with the reason."""
    if isinstance(value, dict) and "__value__" in value:      # ComfyUI's escape for list-valued widgets
        value = value["__value__"]
    if input_type == "INT":
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
    if input_type == "FLOAT":
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if math.isnan(result):
            raise ValueError("expected a number, got NaN")
        return result
    if input_type == "BOOLEAN":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise ValueError(f"expected true or false, got {value!r}")
    if input_type == "STRING":
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected text, got {json.dumps(value)[:60]}")
        return str(value)
    return value


def _accepts_constants(input_type: Any) -> bool:
    """Widget types (and "*") take values typed in the graph; other socket types need a link."""
    if isinstance(input_type, (list, tuple)):
        return True
    if not isinstance(input_type, str):
        return True
    parts = {t.strip() for t in input_type.split(",")}
    return bool(parts & (WIDGET_TYPES | {"*"}))


def _validate_function(cls: type):
    fn = getattr(cls, "VALIDATE_INPUTS", None)
    if fn is None:
        return None, [], False
    spec = inspect.getfullargspec(fn)
    return fn, spec.args, spec.varkw is not None


def _node_issue(prompt: dict, node_id: str, message: str, input_name: str | None = None) -> ValidationIssue:
    node = prompt.get(node_id) or {}
    return ValidationIssue(node_id=node_id, message=message, title=_title(node),
                           class_type=node.get("class_type", ""), input_name=input_name)


def _validate_node(prepared: PreparedWorkflow, node_id: str, node_classes: Mapping[str, type]) -> list[ValidationIssue]:
    prompt = prepared.prompt
    node = prompt[node_id]
    class_type = node["class_type"]
    cls = node_classes[class_type]
    types = _input_types(cls, class_type)
    inputs = node.setdefault("inputs", {})
    if not isinstance(inputs, dict):
        return [_node_issue(prompt, node_id, "'inputs' must be an object")]
    validate_fn, validate_args, validate_kwargs = _validate_function(cls)
    issues: list[ValidationIssue] = []
    received_types: dict[str, Any] = {}

    def issue(message, name):
        issues.append(_node_issue(prompt, node_id, message, name))

    for name, input_type, options, required in _declared_inputs(types):
        if name not in inputs:
            if required:
                why = (prepared.dropped_links or {}).get((node_id, name))
                issue("required input is missing" + (f" ({why})" if why else ""), name)
            continue
        value = inputs[name]
        if isinstance(value, list):
            if not _is_link(value):
                issue(f"bad link {json.dumps(value)[:60]}: a link is [node_id, output_index]", name)
                continue
            source_id, slot = str(value[0]), value[1]
            if source_id not in prompt:
                issue(f"linked to node {source_id}, which is not in the workflow", name)
                continue
            source_class = node_classes[prompt[source_id]["class_type"]]
            return_types = tuple(getattr(source_class, "RETURN_TYPES", ()) or ())
            if not 0 <= slot < len(return_types):
                issue(f"linked to output {slot} of node {source_id} ({prompt[source_id]['class_type']}), "
                      f"which has {len(return_types)} output(s)", name)
                continue
            received = return_types[slot]
            received_types[name] = received
            if "input_types" not in validate_args and not _types_match(received, input_type):
                issue(f"type mismatch: node {source_id} ({prompt[source_id]['class_type']}) outputs {received}, "
                      f"this input takes {_type_label(input_type)}", name)
            continue
        # a constant
        custom_checked = name in validate_args or validate_kwargs
        if not _accepts_constants(input_type) and not custom_checked:
            issue(f"needs a link from a node that outputs {input_type}, got the value {json.dumps(value)[:60]}", name)
            continue
        try:
            value = inputs[name] = _convert_constant(input_type, value)
        except ValueError as exc:
            issue(f"{exc} ({_type_label(input_type)} input)", name)
            continue
        if custom_checked:
            continue
        if "min" in options and isinstance(value, (int, float)) and value < options["min"]:
            issue(f"value {value} is smaller than the minimum {options['min']}", name)
            continue
        if "max" in options and isinstance(value, (int, float)) and value > options["max"]:
            issue(f"value {value} is bigger than the maximum {options['max']}", name)
            continue
        combo = _combo_options(input_type, options)
        if combo is not None and value not in combo:
            listing = (f"one of {len(combo)} options" if len(combo) > COMBO_LIST_SHOWN
                       else ("one of " + ", ".join(repr(o) for o in combo)) if combo else "an option, but the list is empty")
            issue(f"{value!r} is not a valid choice; expected {listing}", name)

    if validate_fn is not None and (validate_args or validate_kwargs):
        issues += _run_validate_inputs(prompt, node_id, cls, types, validate_fn, validate_args, validate_kwargs,
                                       received_types, prepared)
    return issues


def _type_label(input_type: Any) -> str:
    return "a choice" if isinstance(input_type, (list, tuple)) else str(input_type)


def _run_validate_inputs(prompt, node_id, cls, types, validate_fn, validate_args, validate_kwargs, received_types,
                         prepared) -> list[ValidationIssue]:
    """Call VALIDATE_INPUTS with the constant inputs it names (linked ones arrive as None, as in ComfyUI)."""
    inputs = prompt[node_id]["inputs"]
    available = {}
    for name, *_ in _declared_inputs(types):
        if name in inputs:
            available[name] = None if _is_link(inputs[name]) else inputs[name]
    available.update(_hidden_values(types, node_id, prepared))
    if validate_kwargs:
        call_args = dict(available)
    else:
        call_args = {k: v for k, v in available.items() if k in validate_args}
    if "input_types" in validate_args or validate_kwargs:
        call_args["input_types"] = received_types
    try:
        result = validate_fn(**call_args)
    except Exception as exc:
        return [_node_issue(prompt, node_id, f"VALIDATE_INPUTS raised {type(exc).__name__}: {exc}")]
    if result is True:
        return []
    return [_node_issue(prompt, node_id, str(result) if result is not False else "custom validation failed")]


def output_node_ids(prompt: dict, node_classes: Mapping[str, type]) -> list[str]:
    return _sort_ids(i for i, n in prompt.items() if getattr(node_classes[n["class_type"]], "OUTPUT_NODE", False) is True)


def execution_order(prompt: dict, outputs: list[str]) -> list[str]:
    """Dependencies first, each node once, only what the outputs need. Raises WorkflowValidationError on a cycle."""
    order, state = [], {}            # state: 1 = on the current path, 2 = done

    def visit(node_id, path):
        if state.get(node_id) == 2:
            return
        if state.get(node_id) == 1:
            cycle = path[path.index(node_id):] + [node_id]
            raise WorkflowValidationError([ValidationIssue(None, "the graph has a cycle: " + " -> ".join(cycle))])
        state[node_id] = 1
        for value in (prompt[node_id].get("inputs") or {}).values():
            if _is_link(value) and str(value[0]) in prompt:
                visit(str(value[0]), path + [node_id])
        state[node_id] = 2
        order.append(node_id)

    for output_id in outputs:
        visit(output_id, [])
    return order


def validate_workflow(prepared: PreparedWorkflow, node_classes: Mapping[str, type]) -> list[str]:
    """Check the graph like ComfyUI's /prompt; returns the execution order or raises WorkflowValidationError."""
    prompt = prepared.prompt
    outputs = output_node_ids(prompt, node_classes)
    if not outputs:
        raise WorkflowValidationError([ValidationIssue(
            None, "the graph has no output node (a node with OUTPUT_NODE = True, e.g. a sampler or saver), "
                  "so nothing would run")])
    order = execution_order(prompt, outputs)
    issues = []
    for node_id in order:
        issues += _validate_node(prepared, node_id, node_classes)
    if issues:
        raise WorkflowValidationError(issues)
    return order


# ------------------------------------------------------------------------------------------------------------------
# Execution
# ------------------------------------------------------------------------------------------------------------------
def _hidden_values(types: dict, node_id: str, prepared: PreparedWorkflow) -> dict:
    values = {}
    for name, kind in (types.get("hidden") or {}).items():
        kind = kind[0] if isinstance(kind, (list, tuple)) else kind
        if kind == "UNIQUE_ID":
            values[name] = node_id
        elif kind == "PROMPT":
            values[name] = prepared.prompt
        elif kind == "EXTRA_PNGINFO":
            values[name] = prepared.extra_pnginfo
        else:                        # DYNPROMPT, AUTH_TOKEN_COMFY_ORG, API_KEY_COMFY_ORG: nothing headless
            values[name] = None
    return values


def _gather_inputs(node_id: str, prepared: PreparedWorkflow, types: dict, outputs: dict) -> dict:
    """Each input as a list of values, as ComfyUI's get_input_data does (a linked input is its producer's list)."""
    gathered = {}
    for name, value in prepared.prompt[node_id]["inputs"].items():
        _, category, options = _input_spec(types, name)
        if _is_link(value) and not options.get("rawLink"):
            gathered[name] = outputs[str(value[0])][value[1]]
        elif category is not None:
            gathered[name] = [value]
    for name, value in _hidden_values(types, node_id, prepared).items():
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
            label = f"node {node_id}" + (f" '{_title(node)}'" if _title(node) != class_type else "") + f" ({class_type})"
            try:
                comfy_compat.check_interrupt()
                _say(stream, f"[{position}/{len(order)}] {label}")
                started = time.monotonic()
                types = _input_types(cls, class_type)
                returns = _call_over_lists(cls(), getattr(cls, "FUNCTION"), _gather_inputs(node_id, prepared, types, outputs))
                node_outputs, ui = _merge_returns(returns, cls, label)
            except WorkflowError:
                raise
            except Exception as exc:
                if comfy_compat.is_interrupt(exc):
                    result["status"] = "interrupted"
                    raise WorkflowInterrupted(current, result) from exc
                raise NodeExecutionError(node_id, class_type, _title(node), exc) from exc
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
def _ctrl_c_interrupts(stream: TextIO | None):
    """First Ctrl-C asks the running node to stop at its next check; the second aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    presses = [0]

    def on_sigint(signum, frame):
        presses[0] += 1
        if presses[0] == 1:
            comfy_compat.request_interrupt()
            _say(stream if stream is not None else sys.stderr,
                 "\ninterrupt requested: stopping at the next check (press Ctrl-C again to abort now)")
            return
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


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
    node_classes = pack_node_classes() if node_classes is None else node_classes
    stream = (stream if stream is not None else sys.stderr) if show_progress else None
    output_dir = os.path.abspath(os.fspath(output_dir))
    # set before reading the graph: INPUT_TYPES lists models from <output>/checkpoints etc., and validation checks
    # combo values against those lists
    comfy_compat.clear_interrupt()
    try:
        with comfy_compat.using_output_directory(output_dir):
            prepared = prepare_workflow(workflow, node_classes, display_names, overrides)
            order = validate_workflow(prepared, node_classes)
            os.makedirs(output_dir, exist_ok=True)
            guard = _ctrl_c_interrupts(stream) if handle_ctrl_c else contextlib.nullcontext()
            with guard:
                result = execute_workflow(prepared, node_classes, order, stream=stream, inference_mode=inference_mode)
    except WorkflowInterrupted as exc:
        exc.result["output_dir"] = output_dir
        raise
    finally:
        comfy_compat.clear_interrupt()
    result["output_dir"] = output_dir
    return result


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
