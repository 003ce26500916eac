"""example_workflows/*.json: canvas format, widget values valid for each node's INPUT_TYPES, links between matching
sockets, notes present, settings as the A1111 guide recommends, in sync with tests/make_example_workflows.py,
and accepted by the headless runner's /prompt-style validation."""
import json
import math
import os
from pathlib import Path

import pytest

import make_example_workflows as make
import workflow_tools as wt

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "example_workflows"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.json"))
IDS = [p.stem for p in EXAMPLES]
EXPECTED = {make.LORA_PERSON_PRIOR_PRESERVATION, make.FULL_FINETUNE_OBJECT, make.TWO_CONCEPTS,
            make.TRAIN_THEN_GENERATE_CORE_NODES, make.TRAIN_THEN_GENERATE_SAME_GRAPH, make.IMAGIC_EDIT}


def load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def active_nodes(workflow: dict) -> list[dict]:
    return [n for n in workflow["nodes"] if n["type"] not in wt.FRONTEND_ONLY]


def widget_problems(node_type: str, name: str, kind, options: dict, value) -> list[str]:
    """What ComfyUI's /prompt validation (and the frontend) would reject in a saved widget value."""
    where = f"{node_type}.{name} = {value!r}"
    if isinstance(kind, wt.FileList):
        ok = value in kind or (isinstance(value, str) and value.lower().endswith(wt.MODEL_EXTENSIONS))
        return [] if ok else [f"{where}: not a {kind.folder} file name nor one of {list(kind)}"]
    if isinstance(kind, list):
        return [] if value in kind else [f"{where}: not one of {kind}"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: not a boolean"]
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{where}: not a string"]
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return [f"{where}: not a number"]
        if kind == "INT" and not float(value).is_integer():
            return [f"{where}: not an integer"]
        problems = []
        if "min" in options and value < options["min"]:
            problems.append(f"{where}: below the minimum {options['min']}")
        if "max" in options and value > options["max"]:
            problems.append(f"{where}: above the maximum {options['max']}")
        return problems
    return [f"{where}: {kind} is a socket, not a widget"]


# ------------------------------------------------------------------------------------------------------------------
def test_all_expected_examples_are_shipped():
    assert EXPECTED <= set(IDS), sorted(EXPECTED - set(IDS))


def test_examples_are_in_sync_with_their_generator():
    assert make.main(["--check"]) == 0, "run tests/make_example_workflows.py and commit example_workflows/"


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_canvas_format(path):
    wf = load(path)
    assert wf["version"] == 0.4
    assert isinstance(wf["nodes"], list) and isinstance(wf["links"], list) and isinstance(wf["groups"], list)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and wf["last_node_id"] >= max(ids)
    assert wf["last_link_id"] >= max((link[0] for link in wf["links"]), default=0)
    for node in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"):
            assert key in node, f"node {node['id']} lacks {key}"
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
    for group in wf["groups"]:
        assert group["title"] and len(group["bounding"]) == 4


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_notes_explain_the_workflow(path):
    notes = [n for n in load(path)["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes, "every example explains itself in a Note"
    texts = [n["widgets_values"][0] for n in notes]
    assert all(isinstance(t, str) and len(t) > 80 for t in texts)


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_widget_values_are_valid_for_input_types(path):
    problems = []
    for node in active_nodes(load(path)):
        spec = wt.node_spec(node["type"])
        mapped, mapping_problems = wt.map_widgets_values(node["type"], node["widgets_values"])
        problems += [f"node {node['id']} ({node['type']}): {p}" for p in mapping_problems]
        for name, kind, options, _ in wt.declared_inputs(spec):
            if name in mapped:
                problems += [f"node {node['id']}: {p}" for p in widget_problems(node["type"], name, kind, options,
                                                                                mapped[name])]
        # control_after_generate values, where present, are valid
        values = node["widgets_values"]
        for i, value in enumerate(values[1:], 1):
            if isinstance(value, str) and value in wt.CONTROL_AFTER_GENERATE:
                assert isinstance(values[i - 1], int), f"node {node['id']}: stray control value at {i}"
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_sockets_and_links_match(path):
    wf = load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    problems = []
    for node in active_nodes(wf):
        spec = wt.node_spec(node["type"])
        expected_inputs = [(name, kind) for name, kind, _ in wt.socket_inputs(spec)]
        saved_inputs = [(i["name"], i["type"]) for i in node["inputs"] if "widget" not in i]
        if saved_inputs != expected_inputs:
            problems.append(f"node {node['id']} ({node['type']}) sockets {saved_inputs} != {expected_inputs}")
        saved_outputs = [o["type"] for o in node["outputs"]]
        if saved_outputs != list(spec["output"]):
            problems.append(f"node {node['id']} ({node['type']}) outputs {saved_outputs} != {list(spec['output'])}")
        for name, kind, optional in wt.socket_inputs(spec):
            slot = next((i for i in node["inputs"] if i["name"] == name), None)
            if not optional and (slot is None or slot["link"] is None):
                problems.append(f"node {node['id']} ({node['type']}): required input {name} ({kind}) is not linked")
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        source, target = nodes[src], nodes[dst]
        out_type = wt.node_spec(source["type"])["output"][src_slot]
        target_input = target["inputs"][dst_slot]
        in_type = dict((n, k) for n, k, _ in wt.socket_inputs(wt.node_spec(target["type"])))[target_input["name"]]
        if not (out_type == in_type == kind):
            problems.append(f"link {link_id}: {source['type']}[{src_slot}] {out_type} -> "
                            f"{target['type']}.{target_input['name']} {in_type} (saved as {kind})")
        if target_input["link"] != link_id or link_id not in (source["outputs"][src_slot]["links"] or []):
            problems.append(f"link {link_id} is not recorded on both of its nodes")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_every_example_has_an_output_node(path):
    assert any(wt.node_spec(n["type"])["output_node"] for n in active_nodes(load(path)))


def _widgets(path: Path, node_type: str) -> list[dict]:
    return [wt.map_widgets_values(n["type"], n["widgets_values"])[0]
            for n in active_nodes(load(path)) if n["type"] == node_type]


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_training_settings_follow_the_a1111_guide(path):
    if path.stem == make.TOY_WORLD_SUBJECT:
        return _toy_settings_follow_the_toy_benchmark(path)
    for settings in _widgets(path, "DreamBoothSettings"):
        assert settings["lr_scheduler"] == "constant_with_warmup"
        assert 100 <= settings["steps_per_image"] <= 175
        if settings["use_lora"]:
            assert settings["learning_rate"] == pytest.approx(1e-4)
        else:
            assert settings["learning_rate"] == pytest.approx(1e-6)


def _toy_settings_follow_the_toy_benchmark(path):
    """The toy example is no SD 1.5 run: it uses the toy benchmark's full fine-tune row (what bench/quality.py
    measures, and the row that learns the subject there)."""
    from comfyui_dreambooth.training.toyworld.dreambench import FULL

    (settings,) = _widgets(path, "DreamBoothSettings")
    assert settings["use_lora"] == FULL.use_lora and settings["learning_rate"] == pytest.approx(FULL.learning_rate)
    assert settings["max_train_steps"] == FULL.steps and settings["batch_size"] == FULL.batch_size


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_settings_chains_build_valid_configs(path):
    """Run each example's settings nodes along their links: every DB_CONFIG they make validates."""
    wf = load(path)
    classes = wt.pack_classes()
    nodes = {n["id"]: n for n in wf["nodes"]}
    feeds = {(link[3], nodes[link[3]]["inputs"][link[4]]["name"]): link[1] for link in wf["links"]}
    built = {}

    def build(node_id):
        if node_id not in built:
            node = nodes[node_id]
            upstream = feeds.get((node_id, "config"))
            widgets = wt.map_widgets_values(node["type"], node["widgets_values"])[0]
            config = build(upstream) if upstream is not None else None
            built[node_id] = classes[node["type"]]().build(config=config, **widgets)[0]
        return built[node_id]

    settings_types = {"DreamBoothSettings", "DreamBoothOptimizer", "DreamBoothAdvanced", "DreamBoothData",
                      "DreamBoothImagic", "DreamBoothValidation"}
    trains = [n for n in active_nodes(wf) if n["type"] == "TrainDreamBooth"]
    assert trains
    for train in trains:
        config = build(feeds[(train["id"], "config")])
        assert not config.validate(check_environment=False)
    assert all(n["id"] in built for n in active_nodes(wf) if n["type"] in settings_types)


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_the_headless_runner_accepts_pack_only_examples(path, tmp_path):
    """Pack-only examples pass the runner's /prompt-style validation (with the model names present as files);
    core-node examples are refused with the core nodes named (they only run inside ComfyUI)."""
    from comfyui_dreambooth import runner
    from comfyui_dreambooth.nodes import comfy_compat

    wf = load(path)
    core = sorted({n["type"] for n in active_nodes(wf)} - set(wt.pack_classes()))
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for node in active_nodes(wf):
        if node["type"] == "LoadBaseModel":
            (checkpoints / node["widgets_values"][0]).write_bytes(b"")      # combo lists need the file to exist
    with comfy_compat.using_output_directory(tmp_path):
        if core:
            with pytest.raises(runner.CoreNodesError) as info:
                runner.prepare_workflow(str(path))
            assert all(t in str(info.value) for t in core)
            return
        prepared = runner.prepare_workflow(str(path))
        order = runner.validate_workflow(prepared, runner.pack_node_classes())
    assert any(prepared.prompt[i]["class_type"] == "TrainDreamBooth" for i in order)


def test_demo_titles_exist_in_the_lora_example():
    """demo.py and the real-ComfyUI test address the LoRA example's nodes by title."""
    wf = load(EXAMPLES_DIR / f"{make.LORA_PERSON_PRIOR_PRESERVATION}.json")
    titles = {n.get("title") for n in wf["nodes"]}
    assert set(make.TITLES.values()) <= titles


def test_core_node_workflow_loads_the_lora_that_it_saves():
    wf = load(EXAMPLES_DIR / f"{make.TRAIN_THEN_GENERATE_CORE_NODES}.json")
    save = _widgets(EXAMPLES_DIR / f"{make.TRAIN_THEN_GENERATE_CORE_NODES}.json", "SaveLoRA")[0]
    lora = _widgets(EXAMPLES_DIR / f"{make.TRAIN_THEN_GENERATE_CORE_NODES}.json", "LoraLoader")[0]
    assert lora["lora_name"] == save["filename"] + ".safetensors"
    assert save["overwrite"] is True           # a stable name: re-training replaces the file LoraLoader reads
    ckpt = _widgets(EXAMPLES_DIR / f"{make.TRAIN_THEN_GENERATE_CORE_NODES}.json", "CheckpointLoaderSimple")[0]
    base = _widgets(EXAMPLES_DIR / f"{make.TRAIN_THEN_GENERATE_CORE_NODES}.json", "LoadBaseModel")[0]
    assert ckpt["ckpt_name"] == base["model"]  # the LoRA is applied to the model it was trained on
    assert wf["groups"] and len(wf["groups"]) == 2


def test_map_widgets_values_detects_shifted_values():
    values = wt.widgets_values("SampleTrained", {"steps": 4})
    assert wt.map_widgets_values("SampleTrained", values)[1] == []
    assert wt.map_widgets_values("SampleTrained", values[:-1])[1]              # one missing
    assert wt.map_widgets_values("SampleTrained", values + ["extra"])[1]        # one too many
    mapped = wt.map_widgets_values("SampleTrained", [v for v in values if v != "fixed"])[0]   # no control value
    assert mapped["steps"] == 4 and mapped["filename_prefix"] == "dreambooth/sample"


def test_widget_checks_catch_bad_values():
    spec = wt.node_spec("SampleTrained")
    kinds = {n: (k, o) for n, k, o, _ in wt.declared_inputs(spec)}
    assert widget_problems("SampleTrained", "steps", *kinds["steps"], 0)
    assert widget_problems("SampleTrained", "steps", *kinds["steps"], 2.5)
    assert widget_problems("SampleTrained", "steps", *kinds["steps"], True)
    assert widget_problems("SampleTrained", "scheduler", *kinds["scheduler"], "heun")
    assert widget_problems("SampleTrained", "prompt", *kinds["prompt"], 3)
    base = {n: (k, o) for n, k, o, _ in wt.declared_inputs(wt.node_spec("LoadBaseModel"))}
    assert not widget_problems("LoadBaseModel", "model", *base["model"], "any/model.safetensors")
    assert widget_problems("LoadBaseModel", "model", *base["model"], "not a model")
    assert widget_problems("LoadBaseModel", "prediction_type", *base["prediction_type"], "x0")
