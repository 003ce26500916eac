"""The runner's errors: each one reads well as a single line after "error: <file>: "."""
from __future__ import annotations

from dataclasses import dataclass


class WorkflowError(Exception):
    """Base of every problem the runner reports; str() is one clear line."""


class WorkflowFormatError(WorkflowError):
    """Not a readable workflow (bad JSON, neither API nor canvas format, unsupported feature)."""


LISTED = 10        # node ids (and node types) an error lists; the rest are counted ("and N more")


def listed(items: list[str], what: str = "") -> str:
    """The first LISTED items, comma-separated, then "and N more" (a graph of 399k Note nodes made a 3 MB line)."""
    shown = ", ".join(items[:LISTED])
    return shown + (f" and {len(items) - LISTED} more{what}" if len(items) > LISTED else "")


class CoreNodesError(WorkflowError):
    def __init__(self, class_types: dict[str, list[str]]):
        self.class_types = class_types            # every id, for callers; the message lists the first ones
        names = listed([f"{t} (node {listed(list(ids))})" for t, ids in sorted(class_types.items())], " node types")
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
        shown = "; ".join(str(i) for i in issues[:LISTED])
        more = f"; and {len(issues) - LISTED} more" if len(issues) > LISTED else ""
        super().__init__(f"{count}: {shown}{more}")


class NodeExecutionError(WorkflowError):
    def __init__(self, node_id: str, class_type: str, title: str, error: BaseException):
        self.node_id, self.class_type, self.title, self.error = node_id, class_type, title, error
        label = f"node {node_id}" + (f" '{title}'" if title and title != class_type else "") + f" ({class_type})"
        super().__init__(f"{label} failed: {type(error).__name__}: {error}")


class WorkflowInterrupted(WorkflowError):
    def __init__(self, node_id: str | None, result: dict):
        self.node_id, self.result = node_id, result
        super().__init__("interrupted" + (f" while running node {node_id}" if node_id else ""))

