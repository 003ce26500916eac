"""Canvas-workflow helpers shared by tests/make_example_workflows.py (writes example_workflows/) and
tests/test_workflows.py (checks them): node input specs (this pack's from INPUT_TYPES, ComfyUI core nodes' from
a small table), the frontend's widget order, and a builder that lays out nodes, links, notes and groups the way
ComfyUI's frontend saves a workflow (version 0.4, socket-only "inputs", links [id, from, slot, to, slot, type]).
"""
from __future__ import annotations

import uuid

FRONTEND_VERSION = "1.27.10"       # what ComfyUI 0.3.64 pins (requirements.txt: comfyui-frontend-package)
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_AFTER_GENERATE = ("fixed", "increment", "decrement", "randomize")
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")


class FileList(list):
    """A combo whose options are the files of a ComfyUI model folder (they differ per machine)."""

    def __init__(self, folder: str, static: tuple = ()):
        super().__init__(static)
        self.folder = folder


# ComfyUI 0.3.64 core nodes used by the examples (nodes.py; KSampler lists from comfy/samplers.py).
KSAMPLER_SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
KSAMPLER_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                       "linear_quadratic", "kl_optimal"]
CORE_NODES = {
    "CheckpointLoaderSimple": {
        "input": {"required": {"ckpt_name": (FileList("checkpoints"), {})}},
        "output": ("MODEL", "CLIP", "VAE"), "output_name": ("MODEL", "CLIP", "VAE")},
    "LoraLoader": {
        "input": {"required": {"model": ("MODEL", {}), "clip": ("CLIP", {}),
                               "lora_name": (FileList("loras"), {}),
                               "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0}),
                               "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0})}},
        "output": ("MODEL", "CLIP"), "output_name": ("MODEL", "CLIP")},
    "CLIPTextEncode": {
        "input": {"required": {"text": ("STRING", {"multiline": True}), "clip": ("CLIP", {})}},
        "output": ("CONDITIONING",), "output_name": ("CONDITIONING",)},
    "EmptyLatentImage": {
        "input": {"required": {"width": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
                               "height": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
                               "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}},
        "output": ("LATENT",), "output_name": ("LATENT",)},
    "KSampler": {
        "input": {"required": {
            "model": ("MODEL", {}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}),
            "sampler_name": (KSAMPLER_SAMPLERS, {}), "scheduler": (KSAMPLER_SCHEDULERS, {}),
            "positive": ("CONDITIONING", {}), "negative": ("CONDITIONING", {}), "latent_image": ("LATENT", {}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0})}},
        "output": ("LATENT",), "output_name": ("LATENT",)},
    "VAEDecode": {
        "input": {"required": {"samples": ("LATENT", {}), "vae": ("VAE", {})}},
        "output": ("IMAGE",), "output_name": ("IMAGE",)},
    "SaveImage": {
        "input": {"required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
        "output": (), "output_name": (), "output_node": True},
}
# Pack combos that list model files (their saved value may name a file this machine does not have).
PACK_FILE_LIST_INPUTS = {("LoadBaseModel", "model"): "checkpoints", ("LoadBaseModel", "vae"): "vae"}


def pack_classes() -> dict:
    from comfyui_dreambooth import NODE_CLASS_MAPPINGS

    return dict(NODE_CLASS_MAPPINGS)


def node_spec(node_type: str) -> dict:
    """{"input": INPUT_TYPES-like dict, "output": types, "output_name": names, "pack": bool} for a node type."""
    classes = pack_classes()
    if node_type in classes:
        cls = classes[node_type]
        types = cls.INPUT_TYPES()
        inputs = {}
        for category in ("required", "optional"):
            section = {}
            for name, spec in (types.get(category) or {}).items():
                kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
                if (node_type, name) in PACK_FILE_LIST_INPUTS:
                    static = tuple(o for o in kind if not o.lower().endswith(MODEL_EXTENSIONS))
                    kind = FileList(PACK_FILE_LIST_INPUTS[(node_type, name)], static)
                section[name] = (kind, options)
            inputs[category] = section
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        return {"input": inputs, "output": tuple(cls.RETURN_TYPES), "output_name": tuple(names), "pack": True,
                "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    if node_type in CORE_NODES:
        return {**CORE_NODES[node_type], "pack": False, "output_node": CORE_NODES[node_type].get("output_node", False)}
    raise KeyError(f"unknown node type {node_type!r}: add it to CORE_NODES in tests/workflow_tools.py")


def declared_inputs(spec: dict):
    """(name, type, options, required) in the frontend's order: required, then optional."""
    for category in ("required", "optional"):
        for name, (kind, options) in (spec["input"].get(category) or {}).items():
            yield name, kind, options, category == "required"


def is_widget(kind, options) -> bool:
    return not options.get("forceInput") and (isinstance(kind, list) or kind in WIDGET_TYPES)


def has_control_after_generate(name: str, kind, options) -> bool:
    """Whether the frontend adds a 'control after generate' widget (saved right after the value) to an INT widget.

    Frontend 1.27 (useIntWidget): `inputSpec.control_after_generate ?? ["seed", "noise_seed"].includes(name)`, so
    an explicit False turns it off even for an input named seed."""
    if kind != "INT":
        return False
    option = options.get("control_after_generate")
    return bool(option) if option is not None else name in ("seed", "noise_seed")


def socket_inputs(spec: dict) -> list[tuple[str, str, bool]]:
    """(name, type, optional) of the inputs drawn as sockets, in slot order."""
    return [(name, kind, not required) for name, kind, options, required in declared_inputs(spec)
            if not is_widget(kind, options)]


def widget_default(kind, options):
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def widgets_values(node_type: str, values: dict | None = None, control: str = "fixed") -> list:
    """The node's widgets_values list: INPUT_TYPES defaults, `values` (by input name) applied."""
    values = dict(values or {})
    spec = node_spec(node_type)
    out = []
    for name, kind, options, _ in declared_inputs(spec):
        if not is_widget(kind, options):
            continue
        out.append(values.pop(name) if name in values else widget_default(kind, options))
        if has_control_after_generate(name, kind, options):
            out.append(control)
    if values:
        raise KeyError(f"{node_type} has no widget(s) {sorted(values)}")
    return out


def map_widgets_values(node_type: str, saved: list) -> tuple[dict, list[str]]:
    """Inverse of widgets_values: ({input name: value}, problems) for a saved node."""
    spec = node_spec(node_type)
    mapped, problems, i = {}, [], 0
    for name, kind, options, _ in declared_inputs(spec):
        if not is_widget(kind, options):
            continue
        if i >= len(saved):
            problems.append(f"widget {name!r} has no saved value (widgets_values too short)")
            continue
        mapped[name] = saved[i]
        i += 1
        if has_control_after_generate(name, kind, options) and i < len(saved) and saved[i] in CONTROL_AFTER_GENERATE:
            i += 1
    if i < len(saved):
        problems.append(f"{len(saved) - i} extra widgets_values: {saved[i:]!r}")
    return mapped, problems


class Canvas:
    """Builds a canvas workflow as the ComfyUI frontend saves it."""

    def __init__(self, workflow_id: str):
        # a stable id per example, so regenerating gives the same file
        self.id = str(uuid.uuid5(uuid.NAMESPACE_URL, "comfyui-dreambooth/example_workflows/" + workflow_id))
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def _next_id(self) -> int:
        return len(self.nodes) + 1

    def node(self, node_type: str, pos, *, title: str | None = None, widgets: dict | None = None,
             width: int = 340, height: int | None = None, color: tuple[str, str] | None = None,
             mode: int = 0) -> int:
        spec = node_spec(node_type)
        values = widgets_values(node_type, widgets)
        sockets = socket_inputs(spec)
        if height is None:   # roughly what the frontend computes: title, sockets, then one row per widget
            rows = max(len(sockets), len(spec["output"]))
            height = 30 + 22 * rows + 26 * len(values) + 10
            height += sum(60 for n, k, o, _ in declared_inputs(spec) if k == "STRING" and o.get("multiline"))
        node = {
            "id": self._next_id(), "type": node_type, "pos": [pos[0], pos[1]], "size": [width, height],
            "flags": {}, "order": 0, "mode": mode,
            "inputs": [dict({"name": n, "type": t, "link": None}, **({"shape": 7} if optional else {}))
                       for n, t, optional in sockets],
            "outputs": [{"name": name, "type": t, "links": [], "slot_index": i}
                        for i, (t, name) in enumerate(zip(spec["output"], spec["output_name"]))],
            "properties": {"Node name for S&R": node_type},
            "widgets_values": values,
        }
        if spec["pack"]:
            node["properties"]["cnr_id"] = "comfyui-dreambooth"
        else:
            node["properties"].update({"cnr_id": "comfy-core", "ver": "0.3.64"})
        if title:
            node["title"] = title
        if color:
            node["color"], node["bgcolor"] = color
        self.nodes.append(node)
        return node["id"]

    def note(self, text: str, pos, *, width: int = 420, height: int = 260, title: str | None = None) -> int:
        node = {"id": self._next_id(), "type": "Note", "pos": [pos[0], pos[1]], "size": [width, height],
                "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node["id"]

    def _find(self, node_id: int) -> dict:
        return next(n for n in self.nodes if n["id"] == node_id)

    def link(self, from_id: int, output: str | int, to_id: int, input_name: str) -> int:
        source, target = self._find(from_id), self._find(to_id)
        outputs = source["outputs"]
        slot = output if isinstance(output, int) else next(
            i for i, o in enumerate(outputs) if o["name"] == output or o["type"] == output)
        in_slot = next(i for i, s in enumerate(target["inputs"]) if s["name"] == input_name)
        link_id = len(self.links) + 1
        kind = outputs[slot]["type"]
        self.links.append([link_id, from_id, slot, to_id, in_slot, kind])
        outputs[slot]["links"].append(link_id)
        target["inputs"][in_slot]["link"] = link_id
        return link_id

    def group(self, title: str, bounding, color: str = "#3f789e") -> None:
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding),
                            "color": color, "font_size": 24, "flags": {}})

    def _execution_order(self) -> None:
        """The frontend saves each node's position in the execution order as "order"."""
        deps = {n["id"]: {l[1] for l in self.links if l[3] == n["id"]} for n in self.nodes}
        done, order = set(), []
        while len(order) < len(self.nodes):
            ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
            for i in ready:
                done.add(i)
                order.append(i)
        for position, node_id in enumerate(order):
            self._find(node_id)["order"] = position

    def to_json(self) -> dict:
        self._execution_order()
        for node in self.nodes:
            for out in node["outputs"]:
                if not out["links"]:
                    out["links"] = None if node["type"] not in FRONTEND_ONLY else out["links"]
        return {
            "id": self.id, "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": self.groups, "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}, "frontendVersion": FRONTEND_VERSION},
            "version": 0.4,
        }


def core_node_classes() -> dict:
    """Stand-ins for the core nodes (INPUT_TYPES/RETURN_TYPES from CORE_NODES), so the runner's canvas converter
    can turn a workflow that uses them into API format for a real ComfyUI. They cannot run."""
    classes = {}
    for name, spec in CORE_NODES.items():
        def input_types(cls, _spec=spec):
            return _spec["input"]

        classes[name] = type(name, (), {"INPUT_TYPES": classmethod(input_types), "RETURN_TYPES": spec["output"],
                                        "OUTPUT_NODE": spec.get("output_node", False), "FUNCTION": "unavailable"})
    return classes
