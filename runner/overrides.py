"""--set overrides: "Node title or id.input=value" applied to a prepared workflow before validation."""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from .errors import OverrideError, WorkflowFormatError
from .specs import (TOO_DEEP, PreparedWorkflow, check_nesting, declared_inputs, input_types, node_title, shorten,
                    sort_ids)



def parse_override(text: str) -> tuple[str, str, Any]:
    """"Title.input=value" -> (target, input, value); value is JSON when it parses, else the raw string."""
    if "=" not in text:
        raise OverrideError(f"--set {shorten(text)!r}: expected NodeTitleOrId.input=value")
    left, raw_value = text.split("=", 1)
    if "." not in left:
        raise OverrideError(f"--set {shorten(text)!r}: expected NodeTitleOrId.input=value (no '.' before '=')")
    target, input_name = left.rsplit(".", 1)      # titles may contain dots, input names do not
    target, input_name = target.strip(), input_name.strip()
    if not target or not input_name:
        raise OverrideError(f"--set {shorten(text)!r}: expected NodeTitleOrId.input=value")
    try:
        value = json.loads(raw_value)
        check_nesting(value)
    except json.JSONDecodeError:
        value = raw_value
    except (RecursionError, WorkflowFormatError):       # json gives up on nesting a few thousand deep
        raise OverrideError(f"--set {shorten(text)!r}: the value is {TOO_DEEP}") from None
    return target, input_name, value



def _override_targets(prepared: PreparedWorkflow, target: str, input_name: str, text: str) -> list[tuple[str, str]]:
    prompt = prepared.prompt
    if target in prompt:
        return [(target, input_name)]
    primitives = prepared.primitive_targets or {}
    if target in primitives:
        return list(primitives[target])
    explicit_title = lambda n: (n.get("_meta") or {}).get("title")
    for key, label in ((explicit_title, "title"), (lambda n: n.get("class_type"), "node type")):
        matches = sort_ids(i for i, n in prompt.items() if key(n) == target)
        if len(matches) == 1:
            return [(matches[0], input_name)]
        if len(matches) > 1:
            raise OverrideError(f"--set {shorten(text)!r}: {label} {target!r} matches nodes {', '.join(matches)}; "
                                f"use the node id instead")
    known = ", ".join(f"{i} '{node_title(prompt[i])}'" for i in sort_ids(prompt))
    raise OverrideError(f"--set {shorten(text)!r}: no node with id or title {target!r} (nodes: {known})")


def apply_overrides(prepared: PreparedWorkflow, overrides: Iterable[str], node_classes: Mapping[str, type]) -> None:
    for text in overrides or ():
        target, input_name, value = parse_override(text)
        for node_id, name in _override_targets(prepared, target, input_name, text):
            node = prepared.prompt[node_id]
            if target in (prepared.primitive_targets or {}) and target not in prepared.prompt \
                    and input_name not in ("value", name):
                raise OverrideError(f"--set {shorten(text)!r}: a primitive node has one input, 'value'")
            class_type = node["class_type"]
            types = input_types(node_classes[class_type], class_type)
            declared = [n for n, *_ in declared_inputs(types)]
            if name not in declared:
                raise OverrideError(f"--set {shorten(text)!r}: node {node_id} ({class_type}) has no input {name!r}; "
                                    f"its inputs are {', '.join(declared) or '(none)'}")
            node["inputs"][name] = value
