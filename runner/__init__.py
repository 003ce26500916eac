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

# one module per concern; this package re-exports the public API (cli.py, demo.py, the tests)
from .errors import (CoreNodesError, NodeExecutionError, OverrideError, ValidationIssue, WorkflowError,
                     WorkflowFormatError, WorkflowInterrupted, WorkflowValidationError)
from .specs import PreparedWorkflow, pack_display_names, pack_node_classes
from .formats import canvas_to_api, prepare_workflow, read_workflow_file, workflow_format
from .overrides import apply_overrides, parse_override
from .validation import execution_order, output_node_ids, validate_workflow
from .execute import execute_workflow, run_workflow, saved_files

__all__ = [
    "WorkflowError", "WorkflowFormatError", "CoreNodesError", "OverrideError", "ValidationIssue",
    "WorkflowValidationError", "NodeExecutionError", "WorkflowInterrupted",
    "pack_node_classes", "pack_display_names",
    "PreparedWorkflow", "read_workflow_file", "workflow_format", "canvas_to_api", "prepare_workflow",
    "parse_override", "apply_overrides",
    "output_node_ids", "execution_order", "validate_workflow",
    "execute_workflow", "run_workflow", "saved_files",
]
