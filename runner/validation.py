"""Validation: what ComfyUI's /prompt checks, collecting every problem (not just the first)."""
from __future__ import annotations

import inspect
import json
import math
from typing import Any, Mapping

from .errors import ValidationIssue, WorkflowError, WorkflowValidationError
from .specs import (COMBO_LIST_SHOWN, WIDGET_TYPES, PreparedWorkflow, combo_options, declared_inputs, hidden_values,
                    input_types, is_link, node_title, sort_ids)


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
    return ValidationIssue(node_id=node_id, message=message, title=node_title(node),
                           class_type=node.get("class_type", ""), input_name=input_name)


def _validate_node(prepared: PreparedWorkflow, node_id: str, node_classes: Mapping[str, type]) -> list[ValidationIssue]:
    prompt = prepared.prompt
    node = prompt[node_id]
    class_type = node["class_type"]
    cls = node_classes[class_type]
    types = input_types(cls, class_type)
    inputs = node.setdefault("inputs", {})
    if not isinstance(inputs, dict):
        return [_node_issue(prompt, node_id, "'inputs' must be an object")]
    validate_fn, validate_args, validate_kwargs = _validate_function(cls)
    issues: list[ValidationIssue] = []
    received_types: dict[str, Any] = {}

    def issue(message, name):
        issues.append(_node_issue(prompt, node_id, message, name))

    for name, input_type, options, required in declared_inputs(types):
        if name not in inputs:
            if required:
                why = (prepared.dropped_links or {}).get((node_id, name))
                issue("required input is missing" + (f" ({why})" if why else ""), name)
            continue
        value = inputs[name]
        if isinstance(value, list):
            if not is_link(value):
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
        combo = combo_options(input_type, options)
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
    for name, *_ in declared_inputs(types):
        if name in inputs:
            available[name] = None if is_link(inputs[name]) else inputs[name]
    available.update(hidden_values(types, node_id, prepared))
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
    return sort_ids(i for i, n in prompt.items() if getattr(node_classes[n["class_type"]], "OUTPUT_NODE", False) is True)


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
            if is_link(value) and str(value[0]) in prompt:
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
    if not issues:
        issues += _lora_saver_issues(prompt, node_classes, order)
    if issues:
        raise WorkflowValidationError(issues)
    return order


def _lora_saver_issues(prompt: dict, node_classes: Mapping[str, type], order: list[str]) -> list[ValidationIssue]:
    """A SaveLoRA after a training node whose config is a full fine-tune would fail after the whole run: found
    here when the config chain can be computed without running (settings nodes; a wizard's choice is checked by
    the training node itself before it trains)."""
    from ..nodes.train import lora_savers
    from .configs import config_of, training_nodes

    issues = []
    for train_id in training_nodes(prompt, node_classes):
        if train_id not in order or not lora_savers(prompt, train_id):
            continue
        try:
            config = config_of(prompt, train_id)
        except (WorkflowError, ValueError, TypeError):   # a wizard's choice, or a problem its node reports itself
            continue
        if not config.use_lora:
            for saver_id in [i for i in order if lora_savers({i: prompt[i]}, train_id)]:
                issues.append(_node_issue(prompt, saver_id, (
                    f"saves LoRA adapters, but node {train_id} ({node_title(prompt[train_id])}) trains a full "
                    "fine-tune (use_lora off), which has none; turn use_lora on, or save with SaveCheckpoint or "
                    "SaveDiffusers"), "model"))
    return issues

