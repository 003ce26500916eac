"""The runner's vocabulary: node classes, their INPUT_TYPES specs, the prepared workflow and the small graph helpers
the other runner modules share (this module imports none of them)."""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import WorkflowError, WorkflowFormatError

FRONTEND_ONLY_NODES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_AFTER_GENERATE_VALUES = {"fixed", "increment", "decrement", "randomize", "increment-wrap"}
UPLOAD_WIDGET_VALUES = {"image", "upload", "video", "audio"}
MODE_MUTED, MODE_BYPASSED = 2, 4
COMBO_LIST_SHOWN = 20        # longer option lists are summarised in messages (ComfyUI does the same)


@dataclass
class PreparedWorkflow:
    """A workflow in API format, ready to validate and run (formats.prepare_workflow makes it)."""

    prompt: dict                          # API format: {"id": {"class_type", "inputs", "_meta": {"title"}}}
    format: str                           # "api" | "canvas"
    source: str = ""                      # file it came from ("" for a dict)
    extra_pnginfo: dict | None = None     # handed to nodes' EXTRA_PNGINFO hidden input
    # canvas PrimitiveNode id / title -> the (node id, input) pairs it feeds, so --set can target the primitive
    primitive_targets: dict | None = None
    # (node id, input) -> why a canvas link was dropped (muted source...), to explain "required input is missing"
    dropped_links: dict | None = None


# the pack's root package (this package's parent): it keeps NODE_CLASS_MAPPINGS
_PACK = __package__.rpartition(".")[0]
MAX_NESTING = 200       # ComfyUI workflows nest about 8 levels; far deeper is not a workflow (and recursion breaks)
TOO_DEEP = f"too deeply nested (over {MAX_NESTING} levels of lists/objects)"


def check_nesting(data: Any, limit: int = MAX_NESTING) -> None:
    """WorkflowFormatError when `data` nests lists/objects deeper than `limit` (checked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = list(value.values())
        elif not isinstance(value, list):
            continue
        if depth > limit:
            raise WorkflowFormatError(TOO_DEEP)
        stack.extend((item, depth + 1) for item in value if isinstance(item, (dict, list)))


def shorten(text: str, limit: int = 120) -> str:
    """`text` cut in the middle to at most `limit` characters (start and end kept), for messages."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = (limit - 3) // 2
    return text[:keep] + "..." + text[-keep:]


def runner_package():
    """The runner package itself. Callers look pack_node_classes / pack_display_names up there at call time, so
    replacing them on `runner` (as tests do) reaches every module."""
    return sys.modules[__package__]


def pack_node_classes() -> dict[str, type]:
    """This pack's NODE_CLASS_MAPPINGS (kept by the package root __init__.py)."""
    return dict(getattr(importlib.import_module(_PACK), "NODE_CLASS_MAPPINGS", {}) or {})


def pack_display_names() -> dict[str, str]:
    return dict(getattr(importlib.import_module(_PACK), "NODE_DISPLAY_NAME_MAPPINGS", {}) or {})


def input_types(cls: type, class_type: str) -> dict:
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


def input_spec(types: dict, name: str) -> tuple[Any, str | None, dict]:
    """(type, "required"|"optional"|"hidden", options) of input `name`, or (None, None, {})."""
    for category in ("required", "optional", "hidden"):
        section = types.get(category) or {}
        if name in section:
            input_type, options = _spec_parts(section[name])
            return input_type, category, options
    return None, None, {}


def declared_inputs(types: dict) -> list[tuple[str, Any, dict, bool]]:
    """(name, type, options, required) for every required then optional input, in INPUT_TYPES order."""
    out = []
    for category in ("required", "optional"):
        for name, spec in (types.get(category) or {}).items():
            input_type, options = _spec_parts(spec)
            out.append((name, input_type, options, category == "required"))
    return out


def combo_options(input_type: Any, options: dict) -> list | None:
    if isinstance(input_type, (list, tuple)):
        return list(input_type)
    if input_type == "COMBO":
        return list(options.get("options") or [])
    return None


def is_widget(input_type: Any, options: dict) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(input_type, (list, tuple)) or input_type in WIDGET_TYPES


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int)) \
        and isinstance(value[1], int) and not isinstance(value[1], bool)


def sort_ids(ids: Iterable[str]) -> list[str]:
    """Numeric ids in numeric order ("2" before "10"), others after, alphabetically."""
    return sorted(ids, key=lambda i: (0, int(i), "") if str(i).isdigit() else (1, 0, str(i)))



def node_title(node: dict) -> str:
    return (node.get("_meta") or {}).get("title") or node.get("class_type", "")


def hidden_values(types: dict, node_id: str, prepared: PreparedWorkflow) -> dict:
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

