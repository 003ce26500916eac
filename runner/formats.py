"""Reading a workflow file and converting a saved canvas to API format (as ComfyUI's frontend does on Queue)."""
from __future__ import annotations

import errno
import json
import os
from typing import Any, Iterable, Mapping

from .errors import CoreNodesError, WorkflowFormatError
from .overrides import apply_overrides
from .specs import (CONTROL_AFTER_GENERATE_VALUES, FRONTEND_ONLY_NODES, MODE_BYPASSED, MODE_MUTED, TOO_DEEP,
                    UPLOAD_WIDGET_VALUES, PreparedWorkflow, check_nesting, combo_options, declared_inputs,
                    input_types, is_widget, runner_package)


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
    except RecursionError:                       # json's decoder gives up on nesting a few thousand deep
        raise WorkflowFormatError(f"{TOO_DEEP}; not a ComfyUI workflow") from None
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise WorkflowFormatError(f"the path is too long for this system ({len(os.fsencode(path))} "
                                      f"bytes); move or rename the file") from None
        raise
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
        types = input_types(node_classes[class_type], class_type)
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
        for name, input_type, options, _ in declared_inputs(types):
            if not is_widget(input_type, options):
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
    for name, input_type, options, required in declared_inputs(types):
        if name in inputs or not required or not is_widget(input_type, options):
            continue
        combo = combo_options(input_type, options)
        if "default" in options:
            inputs[name] = options["default"]
        elif combo:
            inputs[name] = combo[0]
    return inputs


def prepare_workflow(workflow: dict | str | os.PathLike, node_classes: Mapping[str, type] | None = None,
                     display_names: Mapping[str, str] | None = None,
                     overrides: Iterable[str] = ()) -> PreparedWorkflow:
    """Read (path or dict), convert to API format, check node types, apply --set overrides."""
    node_classes = runner_package().pack_node_classes() if node_classes is None else node_classes
    display_names = runner_package().pack_display_names() if display_names is None else display_names
    source = ""
    if isinstance(workflow, (str, os.PathLike)):
        source = os.fspath(workflow)
        workflow = read_workflow_file(source)
    check_nesting(workflow)
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

