"""The DB_CONFIG a workflow builds for each training node, computed without training: the settings nodes (in any
order) and a PerformanceWizard of the chain that feeds the node's `config` input, evaluated by the node classes
themselves. Used by `estimate --workflow`, by the whole-graph checks before a run (a SaveLoRA after a full
fine-tune) and by `run --num-processes` before it starts processes (settings several processes refuse).
"""
from __future__ import annotations

from typing import Callable, Mapping

from ..nodes.concepts import NODE_CLASS_MAPPINGS as CONCEPT_NODES
from ..nodes.settings import NODE_CLASS_MAPPINGS as SETTINGS_NODES
from ..nodes.wizard import NODE_CLASS_MAPPINGS as WIZARD_NODES
from .errors import WorkflowError
from .specs import is_link, node_title, sort_ids


class ConfigUnknown(WorkflowError):
    """The chain needs what only a run has (a PerformanceWizard's model): no config without running."""


def label(prompt: dict, node_id: str) -> str:
    node = prompt.get(node_id) or {}
    title, kind = node_title(node), node.get("class_type", "?")
    return f"node {node_id} ({kind})" if title == kind else f"node {node_id} ({kind}, '{title}')"


def training_nodes(prompt: dict, node_classes: Mapping[str, type]) -> list[str]:
    """The ids of the nodes that train (class attribute TRAINS), in id order."""
    return sort_ids(i for i, n in prompt.items()
                    if isinstance(n, dict) and getattr(node_classes.get(n.get("class_type")), "TRAINS", False))


def settings_ends(prompt: dict) -> list[str]:
    """Settings / wizard nodes whose config no other settings node takes (the ends of the chains)."""
    makers = {i for i, n in prompt.items() if n.get("class_type") in {**SETTINGS_NODES, **WIZARD_NODES}}
    consumed = {str(v[0]) for i in makers for k, v in (prompt[i].get("inputs") or {}).items()
                if k == "config" and is_link(v)}
    return sort_ids(i for i in makers if i not in consumed)


def _widget_defaults(cls) -> dict:
    """The default value of each required widget of a node class (a combo's first choice without one)."""
    defaults = {}
    for name, spec in (cls.INPUT_TYPES().get("required") or {}).items():
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        if "default" in options:
            defaults[name] = options["default"]
        elif isinstance(kind, (list, tuple)) and kind:
            defaults[name] = kind[0]
    return defaults


def config_of(prompt: dict, node_id: str, *, model=None, vram_gb: float | None = None,
              log: Callable[[str], None] | None = None):
    """The DreamBoothSettings that node `node_id` receives on its `config` input (or builds, for a settings or
    wizard node). `model`: what a PerformanceWizard plans for (an SDModel or a family keyword such as 'sd15'); None
    raises ConfigUnknown for a chain with a wizard. `vram_gb`: the card a wizard with vram_gb 0 plans for (else the
    detected memory, as the node does). Raises WorkflowError naming the node when the chain cannot be computed."""
    built: dict = {}

    def evaluate(nid: str, path: tuple):
        if nid in path:
            raise WorkflowError(f"the config chain has a cycle at {label(prompt, nid)}")
        if nid not in prompt:
            raise WorkflowError(f"the config comes from node {nid}, which is not in the workflow")
        if nid not in built:
            built[nid] = _build(nid, path + (nid,))
        return built[nid]

    def linked(inputs: dict, name: str, path: tuple):
        link = inputs.pop(name, None)
        if link is None:
            return None
        if not is_link(link):
            raise WorkflowError(f"{label(prompt, path[-1])}: its {name} input is not a link")
        return evaluate(str(link[0]), path)

    def _build(nid: str, path: tuple):
        node = prompt[nid]
        kind = node.get("class_type")
        inputs = dict(node.get("inputs") or {})
        for name, value in inputs.items():
            if is_link(value) and name not in ("config", "concepts", "model"):
                raise WorkflowError(f"{label(prompt, nid)}: its {name} input comes from another node; only "
                                    "typed-in values can be computed without running the workflow")
        if kind in SETTINGS_NODES:
            inputs.pop("model", None)               # only for the node's own memory estimate
            upstream = linked(inputs, "config", path)
            try:
                return SETTINGS_NODES[kind]().build(config=upstream, **inputs)[0]
            except TypeError as e:
                raise WorkflowError(f"{label(prompt, nid)}: {e}") from None
        if kind in WIZARD_NODES or kind in CONCEPT_NODES:      # widgets left out: their defaults, as the canvas
            inputs = {**_widget_defaults({**WIZARD_NODES, **CONCEPT_NODES}[kind]), **inputs}
        if kind in WIZARD_NODES:
            if model is None:
                raise ConfigUnknown(f"{label(prompt, nid)} chooses the settings from the model it is given")
            inputs.pop("model", None)
            upstream = linked(inputs, "config", path)
            concepts = linked(inputs, "concepts", path)
            if not inputs.get("vram_gb") and vram_gb is not None:
                inputs["vram_gb"] = vram_gb
            out = WIZARD_NODES[kind]().choose(model, config=upstream, concepts=concepts, **inputs)
            if log is not None:
                log(f"{label(prompt, nid)}: {out['result'][1].splitlines()[0]}")
            return out["result"][0]
        if kind in CONCEPT_NODES:
            upstream = linked(inputs, "concepts", path)
            return CONCEPT_NODES[kind]().build(concepts=upstream, **inputs)["result"][0]
        raise WorkflowError(f"{label(prompt, nid)} is not a DreamBooth settings, PerformanceWizard or concept "
                            "node: its output cannot be computed without running the workflow")

    node = prompt.get(node_id) or {}
    if node.get("class_type") in {**SETTINGS_NODES, **WIZARD_NODES}:
        return evaluate(node_id, ())
    link = (node.get("inputs") or {}).get("config")
    if not is_link(link):
        raise WorkflowError(f"{label(prompt, node_id)} has no config input connected")
    return evaluate(str(link[0]), (node_id,))
