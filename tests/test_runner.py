"""runner/: API/canvas workflows, --set overrides, ComfyUI-like validation and execution, with fake node classes."""
import json
import os
import signal
import threading
from pathlib import Path

import pytest

from comfyui_dreambooth import runner
from comfyui_dreambooth.nodes import comfy_compat
from comfyui_dreambooth.runner import (CoreNodesError, NodeExecutionError, OverrideError, WorkflowError,
                                       WorkflowFormatError, WorkflowInterrupted, WorkflowValidationError)

CALLS = []


# --- fake node classes, shaped like this pack's (classic V1 API) -------------------------------------------------------
class MakeNumber:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 3, "min": 0, "max": 100, "tooltip": "a number"})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "make"
    CATEGORY = "DreamBooth/test"

    def make(self, value):
        CALLS.append(("MakeNumber", value))
        return (value,)


class AddNumbers:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"forceInput": True}),
                             "b": ("INT", {"default": 1, "min": -10, "max": 10})},
                "optional": {"scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "add"
    CATEGORY = "DreamBooth/test"

    def add(self, a, b, scale=1.0):
        CALLS.append(("AddNumbers", a, b))
        return (int((a + b) * scale),)


class Settings:
    """Every widget kind, plus a seed with control_after_generate, in INPUT_TYPES order."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prompt": ("STRING", {"multiline": True, "default": "a photo"}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**32 - 1, "control_after_generate": True}),
                             "mode": (["lora", "full"], {"default": "lora"}),
                             "lr": ("FLOAT", {"default": 1e-4, "min": 0.0, "max": 1.0}),
                             "flag": ("BOOLEAN", {"default": True}),
                             "scheduler": ("COMBO", {"options": ["euler", "ddim"], "default": "euler"})}}
    RETURN_TYPES = ("DB_THING",)
    FUNCTION = "build"
    CATEGORY = "DreamBooth/test"

    def build(self, **settings):
        CALLS.append(("Settings", settings))
        return (dict(settings),)


class ShowThing:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"thing": ("DB_THING",)},
                "optional": {"number": ("INT", {"forceInput": True})},
                "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}
    RETURN_TYPES = ()
    FUNCTION = "show"
    OUTPUT_NODE = True
    CATEGORY = "DreamBooth/test"

    def show(self, thing, number=None, unique_id=None, prompt=None, extra_pnginfo=None):
        CALLS.append(("ShowThing", thing, number, unique_id, prompt is not None, extra_pnginfo))
        return {"ui": {"text": [json.dumps(thing, sort_keys=True)]}}


class ShowNumber:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"number": ("INT", {"forceInput": True})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "show"
    OUTPUT_NODE = True
    CATEGORY = "DreamBooth/test"

    def show(self, number):
        CALLS.append(("ShowNumber", number))
        return {"ui": {"numbers": [number]}, "result": (number,)}


class ListNumbers:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 3, "min": 1, "max": 10})}}
    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "make"
    CATEGORY = "DreamBooth/test"

    def make(self, count):
        return (list(range(count)),)


class SumList:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"numbers": ("INT", {"forceInput": True})}}
    RETURN_TYPES = ("INT",)
    INPUT_IS_LIST = True
    FUNCTION = "total"
    CATEGORY = "DreamBooth/test"

    def total(self, numbers):
        return (sum(numbers),)


class Explode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"number": ("INT", {"forceInput": True})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "boom"
    CATEGORY = "DreamBooth/test"

    def boom(self, number):
        raise ValueError("the concept folder /data/dog is empty")


class SlowCounter:
    """Uses comfy_compat.Progress like a training node; requests an interrupt half way (as Ctrl-C would)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 10, "min": 1, "max": 1000}),
                             "interrupt_at": ("INT", {"default": 0, "min": 0, "max": 1000})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "count"
    OUTPUT_NODE = True
    CATEGORY = "DreamBooth/test"

    def count(self, steps, interrupt_at):
        done = 0
        with comfy_compat.Progress(steps, label="count") as progress:
            for step in range(steps):
                if interrupt_at and step == interrupt_at:
                    comfy_compat.request_interrupt()
                progress.update(1)
                done += 1
        return (done,)


class Picky:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "ok"}), "size": ("INT", {"default": 64, "min": 8})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "DreamBooth/test"

    @classmethod
    def VALIDATE_INPUTS(cls, name, size):
        if size % 8:
            return f"size {size} must be a multiple of 8"
        return True

    def run(self, name, size):
        return (size,)


class WritesFile:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"filename_prefix": ("STRING", {"default": "db"})}}
    RETURN_TYPES = ()
    FUNCTION = "write"
    OUTPUT_NODE = True
    CATEGORY = "DreamBooth/test"

    def write(self, filename_prefix):
        folder = comfy_compat.output_directory()
        name = f"{filename_prefix}_00001_.txt"
        with open(os.path.join(folder, name), "w") as f:
            f.write("hello")
        return {"ui": {"images": [{"filename": name, "subfolder": "", "type": "output"}]}}


CLASSES = {cls.__name__: cls for cls in (MakeNumber, AddNumbers, Settings, ShowThing, ShowNumber, ListNumbers,
                                         SumList, Explode, SlowCounter, Picky, WritesFile)}
DISPLAY = {"ShowThing": "Show Thing"}


@pytest.fixture(autouse=True)
def reset_calls():
    CALLS.clear()
    comfy_compat.clear_interrupt()
    yield
    comfy_compat.clear_interrupt()


def run(workflow, tmp_path, **kw):
    kw.setdefault("node_classes", CLASSES)
    kw.setdefault("display_names", DISPLAY)
    kw.setdefault("show_progress", False)
    kw.setdefault("inference_mode", False)
    return runner.run_workflow(workflow, output_dir=tmp_path / "out", **kw)


def api_graph():
    return {
        "1": {"class_type": "MakeNumber", "inputs": {"value": 5}, "_meta": {"title": "Start"}},
        "2": {"class_type": "AddNumbers", "inputs": {"a": ["1", 0], "b": 2}},
        "3": {"class_type": "ShowNumber", "inputs": {"number": ["2", 0]}, "_meta": {"title": "Result"}},
        "4": {"class_type": "MakeNumber", "inputs": {"value": 9}},          # feeds nothing: must not run
    }


# --- API format ----------------------------------------------------------------------------------------------------
def test_api_graph_runs_in_dependency_order_each_node_once(tmp_path):
    result = run(api_graph(), tmp_path)
    assert result["status"] == "success"
    assert result["executed"] == ["1", "2", "3"]
    assert CALLS == [("MakeNumber", 5), ("AddNumbers", 5, 2), ("ShowNumber", 7)]
    assert result["outputs"] == {"3": {"numbers": [7]}}
    assert result["results"]["3"] == [[7]]
    assert result["format"] == "api"
    assert os.path.isdir(result["output_dir"])


def test_api_graph_from_file_and_wrapped_prompt(tmp_path):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps({"prompt": api_graph(), "client_id": "x"}))
    assert run(str(path), tmp_path)["outputs"]["3"] == {"numbers": [7]}


def test_shared_producer_runs_once(tmp_path):
    graph = api_graph()
    graph["5"] = {"class_type": "ShowNumber", "inputs": {"number": ["2", 0]}}
    result = run(graph, tmp_path)
    assert [c[0] for c in CALLS].count("AddNumbers") == 1
    assert result["executed"] == ["1", "2", "3", "5"]


def test_hidden_inputs_are_supplied(tmp_path):
    graph = {"1": {"class_type": "Settings", "inputs": {"prompt": "p", "seed": 1, "mode": "full", "lr": 0.5,
                                                         "flag": False, "scheduler": "ddim"}},
             "7": {"class_type": "ShowThing", "inputs": {"thing": ["1", 0]}}}
    result = run(graph, tmp_path)
    show = [c for c in CALLS if c[0] == "ShowThing"][0]
    assert show[3] == "7" and show[4] is True and show[5] is None
    assert json.loads(result["outputs"]["7"]["text"][0])["mode"] == "full"


def test_list_outputs_fan_out_and_input_is_list_collects(tmp_path):
    graph = {"1": {"class_type": "ListNumbers", "inputs": {"count": 4}},
             "2": {"class_type": "AddNumbers", "inputs": {"a": ["1", 0], "b": 10}},   # runs 4 times
             "3": {"class_type": "ShowNumber", "inputs": {"number": ["2", 0]}},        # 4 times, ui merged
             "4": {"class_type": "SumList", "inputs": {"numbers": ["1", 0]}},
             "5": {"class_type": "ShowNumber", "inputs": {"number": ["4", 0]}}}
    result = run(graph, tmp_path)
    assert result["outputs"]["3"] == {"numbers": [10, 11, 12, 13]}
    assert result["outputs"]["5"] == {"numbers": [6]}


def test_ui_file_outputs_land_in_the_output_dir(tmp_path):
    result = run({"1": {"class_type": "WritesFile", "inputs": {"filename_prefix": "x"}}}, tmp_path)
    files = runner.saved_files(result)
    assert files == [str(tmp_path / "out" / "x_00001_.txt")]
    assert open(files[0]).read() == "hello"
    # the headless output folder is restored after the run
    assert comfy_compat.output_directory() != str(tmp_path / "out")


# --- validation --------------------------------------------------------------------------------------------------
def validation_messages(graph, tmp_path, **kw):
    with pytest.raises(WorkflowValidationError) as info:
        run(graph, tmp_path, **kw)
    assert CALLS == []            # nothing runs when validation fails
    return [str(i) for i in info.value.issues], str(info.value)


def test_validation_collects_every_problem(tmp_path):
    graph = {
        "1": {"class_type": "MakeNumber", "inputs": {"value": 500}, "_meta": {"title": "Start"}},
        "2": {"class_type": "AddNumbers", "inputs": {"a": ["1", 0], "b": "x", "scale": -1}},
        "3": {"class_type": "ShowNumber", "inputs": {}},
        "4": {"class_type": "Settings", "inputs": {"prompt": "p", "seed": 1, "mode": "half", "lr": 0.1,
                                                   "flag": "maybe", "scheduler": "karras"}},
        "5": {"class_type": "ShowThing", "inputs": {"thing": ["1", 0]}},      # INT into DB_THING
        "6": {"class_type": "ShowNumber", "inputs": {"number": ["2", 0]}},
        "7": {"class_type": "ShowThing", "inputs": {"thing": ["4", 0], "number": ["99", 0]}},
    }
    messages, line = validation_messages(graph, tmp_path)
    expected = [
        "node 1 'Start' (MakeNumber) input 'value': value 500 is bigger than the maximum 100",
        "node 2 (AddNumbers) input 'b': expected an integer, got 'x' (INT input)",
        "node 2 (AddNumbers) input 'scale': value -1.0 is smaller than the minimum 0.0",
        "node 3 (ShowNumber) input 'number': required input is missing",
        "node 5 (ShowThing) input 'thing': type mismatch: node 1 (MakeNumber) outputs INT, "
        "this input takes DB_THING",
        "node 4 (Settings) input 'mode': 'half' is not a valid choice; expected one of 'lora', 'full'",
        "node 4 (Settings) input 'flag': expected true or false, got 'maybe' (BOOLEAN input)",
        "node 4 (Settings) input 'scheduler': 'karras' is not a valid choice; expected one of 'euler', 'ddim'",
        "node 7 (ShowThing) input 'number': linked to node 99, which is not in the workflow",
    ]
    for message in expected:
        assert message in messages, (message, messages)
    assert len(messages) == len(expected)
    assert line.startswith(f"{len(expected)} validation errors: ") and "\n" not in line


def test_validation_rejects_bad_links_and_constant_for_socket(tmp_path):
    graph = {"1": {"class_type": "MakeNumber", "inputs": {"value": 1}},
             "2": {"class_type": "ShowNumber", "inputs": {"number": ["1", 3]}},
             "3": {"class_type": "ShowThing", "inputs": {"thing": "not a link"}},
             "4": {"class_type": "ShowNumber", "inputs": {"number": ["1", 0, 7]}}}
    messages, _ = validation_messages(graph, tmp_path)
    assert any("linked to output 3 of node 1 (MakeNumber), which has 1 output(s)" in m for m in messages)
    assert any("needs a link from a node that outputs DB_THING" in m for m in messages)
    assert any("bad link" in m for m in messages)


def test_validation_needs_an_output_node(tmp_path):
    _, line = validation_messages({"1": {"class_type": "MakeNumber", "inputs": {"value": 1}}}, tmp_path)
    assert "no output node" in line


def test_validation_detects_cycles(tmp_path):
    graph = {"1": {"class_type": "AddNumbers", "inputs": {"a": ["2", 0], "b": 1}},
             "2": {"class_type": "AddNumbers", "inputs": {"a": ["1", 0], "b": 1}},
             "3": {"class_type": "ShowNumber", "inputs": {"number": ["2", 0]}}}
    _, line = validation_messages(graph, tmp_path)
    assert "cycle" in line


def test_validate_inputs_hook_replaces_builtin_checks(tmp_path):
    messages, _ = validation_messages({"1": {"class_type": "Picky", "inputs": {"name": "n", "size": 12}}}, tmp_path)
    assert messages == ["node 1 (Picky): size 12 must be a multiple of 8"]
    # size 0 would fail min=8, but VALIDATE_INPUTS names `size`, so (as in ComfyUI) only it decides
    assert run({"1": {"class_type": "Picky", "inputs": {"name": "n", "size": 0}}}, tmp_path)["status"] == "success"


def test_values_are_converted_like_comfyui(tmp_path):
    graph = {"1": {"class_type": "MakeNumber", "inputs": {"value": "42"}},
             "2": {"class_type": "ShowNumber", "inputs": {"number": ["1", 0]}}}
    run(graph, tmp_path)
    assert CALLS[0] == ("MakeNumber", 42)


def test_core_nodes_are_named(tmp_path):
    graph = api_graph()
    graph["8"] = {"class_type": "KSampler", "inputs": {}}
    graph["9"] = {"class_type": "SaveImage", "inputs": {}}
    graph["10"] = {"class_type": "KSampler", "inputs": {}}
    with pytest.raises(CoreNodesError) as info:
        run(graph, tmp_path)
    assert "KSampler (node 10, 8)" in str(info.value) or "KSampler (node 8, 10)" in str(info.value)
    assert "SaveImage (node 9)" in str(info.value)
    assert "run it inside ComfyUI or remove them" in str(info.value)


def test_many_unknown_nodes_give_a_short_line(tmp_path):
    """Issue 24.10: a workflow of 399k Note nodes gave a 3 MB line listing every node id."""
    graph = api_graph()
    for i in range(100, 20_100):
        graph[str(i)] = {"class_type": "Note", "inputs": {}}
    for i in range(30):
        graph[str(50_000 + i)] = {"class_type": f"Other{i:02d}", "inputs": {}}
    with pytest.raises(CoreNodesError) as info:
        run(graph, tmp_path)
    message = str(info.value)
    assert len(message) < 1000, len(message)
    assert "Note (node 100, 101, 102, 103, 104, 105, 106, 107, 108, 109 and 19990 more)" in message, message
    assert "Other00 (node 50000)" in message and "and 21 more node types" in message, message
    assert "run it inside ComfyUI or remove them" in message
    assert len(info.value.class_types["Note"]) == 20_000          # the whole list stays on the exception
    graph = {str(i): {"class_type": "MakeNumber", "inputs": {"value": 999}} for i in range(5000)}
    graph |= {str(10_000 + i): {"class_type": "ShowNumber", "inputs": {"number": [str(i), 0]}} for i in range(5000)}
    with pytest.raises(WorkflowValidationError) as info:
        run(graph, tmp_path)
    assert str(info.value).startswith("5000 validation errors: node "), str(info.value)[:300]
    assert str(info.value).endswith("; and 4990 more") and len(str(info.value)) < 2000
    assert len(info.value.issues) == 5000


# --- execution errors and interrupts --------------------------------------------------------------------------------
def test_node_exception_names_the_node(tmp_path):
    graph = {"1": {"class_type": "MakeNumber", "inputs": {"value": 1}},
             "2": {"class_type": "Explode", "inputs": {"number": ["1", 0]}, "_meta": {"title": "Trainer"}},
             "3": {"class_type": "ShowNumber", "inputs": {"number": ["2", 0]}}}
    with pytest.raises(NodeExecutionError) as info:
        run(graph, tmp_path)
    assert str(info.value) == ("node 2 'Trainer' (Explode) failed: ValueError: the concept folder /data/dog is empty")
    assert isinstance(info.value.__cause__, ValueError)


def test_interrupt_from_progress_stops_the_run(tmp_path):
    graph = {"1": {"class_type": "SlowCounter", "inputs": {"steps": 10, "interrupt_at": 4}}}
    with pytest.raises(WorkflowInterrupted) as info:
        run(graph, tmp_path)
    assert info.value.node_id == "1"
    assert info.value.result["status"] == "interrupted"
    assert not comfy_compat.interrupt_requested()      # the flag does not leak into the next run
    assert run({"1": {"class_type": "SlowCounter", "inputs": {"steps": 3, "interrupt_at": 0}}},
               tmp_path)["results"]["1"] == [[3]]


def test_first_ctrl_c_requests_interrupt_second_aborts(tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals need the main thread")
    seen = []

    class CtrlC:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}
        RETURN_TYPES = ()
        FUNCTION = "go"
        OUTPUT_NODE = True

        def go(self):
            handler = signal.getsignal(signal.SIGINT)
            handler(signal.SIGINT, None)              # first press: only a request
            seen.append(comfy_compat.interrupt_requested())
            try:
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            except KeyboardInterrupt:
                seen.append("abort")
                raise
            return ()

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run({"1": {"class_type": "CtrlC", "inputs": {}}}, tmp_path, node_classes={"CtrlC": CtrlC})
    assert seen == [True, "abort"]
    assert signal.getsignal(signal.SIGINT) is before


def test_bad_return_value_is_reported(tmp_path):
    class Bad:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}
        RETURN_TYPES = ("INT",)
        FUNCTION = "go"
        OUTPUT_NODE = True

        def go(self):
            return 5

    with pytest.raises(WorkflowError, match="returned a int; a node function must return a tuple"):
        run({"1": {"class_type": "Bad", "inputs": {}}}, tmp_path, node_classes={"Bad": Bad})


def test_inference_mode_like_comfyui(tmp_path):
    torch = pytest.importorskip("torch")
    seen = []

    class Probe:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}
        RETURN_TYPES = ()
        FUNCTION = "go"
        OUTPUT_NODE = True

        def go(self):
            seen.append(torch.is_inference_mode_enabled())
            return ()

    run({"1": {"class_type": "Probe", "inputs": {}}}, tmp_path, node_classes={"Probe": Probe}, inference_mode=True)
    assert seen == [True]


# --- --set overrides ---------------------------------------------------------------------------------------------------
def test_overrides_by_id_title_and_unique_class(tmp_path):
    result = run(api_graph(), tmp_path, overrides=["Start.value=10", "2.b=-3", "AddNumbers.scale=2",
                                                   "Result.number=1"])
    # Result.number replaced the link by a constant, so AddNumbers/MakeNumber no longer run
    assert result["outputs"]["3"] == {"numbers": [1]}
    result = run(api_graph(), tmp_path, overrides=["Start.value=10", "2.b=-3", "AddNumbers.scale=2"])
    assert result["outputs"]["3"] == {"numbers": [14]}


def test_override_values_are_json_or_text(tmp_path):
    graph = {"1": {"class_type": "Settings", "inputs": {"prompt": "p", "seed": 1, "mode": "lora", "lr": 0.1,
                                                         "flag": True, "scheduler": "euler"}, "_meta": {"title": "S"}},
             "2": {"class_type": "ShowThing", "inputs": {"thing": ["1", 0]}}}
    run(graph, tmp_path, overrides=["S.prompt=photo of sks dog, 4k", "S.flag=false", "S.lr=2e-4",
                                    "S.prompt.x=ignored" if False else "S.seed=7"])
    settings = [c for c in CALLS if c[0] == "Settings"][0][1]
    assert settings["prompt"] == "photo of sks dog, 4k" and settings["flag"] is False
    assert settings["lr"] == 2e-4 and settings["seed"] == 7


@pytest.mark.parametrize("override, message", [
    ("Nope.value=1", "no node with id or title 'Nope'"),
    ("MakeNumber.value=1", "node type 'MakeNumber' matches nodes 1, 4; use the node id instead"),
    ("Start.colour=1", "node 1 (MakeNumber) has no input 'colour'; its inputs are value"),
    ("Start.value", "expected NodeTitleOrId.input=value"),
    ("value=3", "no '.' before '='"),
])
def test_bad_overrides_are_clear(tmp_path, override, message):
    with pytest.raises(OverrideError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(api_graph(), tmp_path, overrides=[override])


def test_override_out_of_range_is_a_validation_error(tmp_path):
    with pytest.raises(WorkflowValidationError, match="value 1000 is bigger than the maximum 100"):
        run(api_graph(), tmp_path, overrides=["Start.value=1000"])


# --- canvas format -----------------------------------------------------------------------------------------------------
def canvas_graph():
    """Settings (widgets incl. seed control value) -> Reroute -> ShowThing; a primitive feeds MakeNumber via a
    converted widget; a bypassed AddNumbers passes its INT through; a muted node and a Note are ignored."""
    return {
        "last_node_id": 9, "last_link_id": 6, "version": 0.4,
        "nodes": [
            {"id": 1, "type": "Settings", "mode": 0, "title": "My settings",
             "inputs": [{"name": "prompt", "type": "STRING", "widget": {"name": "prompt"}, "link": None}],
             "outputs": [{"name": "DB_THING", "type": "DB_THING", "links": [1]}],
             "widgets_values": ["photo of sks dog", 1234, "randomize", "full", 0.5, False, "ddim"]},
            {"id": 2, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
             "outputs": [{"name": "", "type": "DB_THING", "links": [2]}]},
            {"id": 3, "type": "ShowThing", "mode": 0,
             "inputs": [{"name": "thing", "type": "DB_THING", "link": 2},
                        {"name": "number", "type": "INT", "link": 5}],
             "outputs": [], "widgets_values": []},
            {"id": 4, "type": "PrimitiveNode", "mode": 0, "title": "how many",
             "outputs": [{"name": "INT", "type": "INT", "links": [3], "widget": {"name": "value"}}],
             "widgets_values": [40, "fixed"]},
            {"id": 5, "type": "MakeNumber", "mode": 0,
             "inputs": [{"name": "value", "type": "INT", "widget": {"name": "value"}, "link": 3}],
             "outputs": [{"name": "INT", "type": "INT", "links": [4]}], "widgets_values": [3]},
            {"id": 6, "type": "AddNumbers", "mode": 4,
             "inputs": [{"name": "a", "type": "INT", "link": 4}],
             "outputs": [{"name": "INT", "type": "INT", "links": [5]}], "widgets_values": [1, 1.0]},
            {"id": 7, "type": "KSampler", "mode": 2, "inputs": [], "outputs": [], "widgets_values": []},
            {"id": 8, "type": "Note", "mode": 0, "widgets_values": ["frontend-only note"]},
            {"id": 9, "type": "MarkdownNote", "mode": 0, "widgets_values": ["# hi"]},
        ],
        "links": [[1, 1, 0, 2, 0, "DB_THING"], [2, 2, 0, 3, 0, "DB_THING"], [3, 4, 0, 5, 0, "INT"],
                  [4, 5, 0, 6, 0, "INT"], [5, 6, 0, 3, 1, "INT"]],
        "groups": [], "config": {}, "extra": {},
    }


def test_canvas_conversion_maps_widgets_and_frontend_nodes():
    prepared = runner.prepare_workflow(canvas_graph(), CLASSES, DISPLAY)
    assert prepared.format == "canvas"
    assert set(prepared.prompt) == {"1", "3", "5"}
    assert prepared.prompt["1"]["inputs"] == {"prompt": "photo of sks dog", "seed": 1234, "mode": "full",
                                              "lr": 0.5, "flag": False, "scheduler": "ddim"}
    assert prepared.prompt["1"]["_meta"]["title"] == "My settings"
    assert prepared.prompt["3"]["inputs"] == {"thing": ["1", 0], "number": ["5", 0]}   # reroute + bypass resolved
    assert prepared.prompt["3"]["_meta"]["title"] == "Show Thing"                       # display name
    assert prepared.prompt["5"]["inputs"] == {"value": 40}                               # primitive's value


def test_canvas_runs_and_passes_the_workflow_as_extra_pnginfo(tmp_path):
    path = tmp_path / "canvas.json"
    path.write_text(json.dumps(canvas_graph()))
    result = run(str(path), tmp_path)
    assert result["format"] == "canvas"
    show = [c for c in CALLS if c[0] == "ShowThing"][0]
    assert show[2] == 40 and show[3] == "3"
    assert show[5]["workflow"]["nodes"][0]["title"] == "My settings"
    assert json.loads(result["outputs"]["3"]["text"][0])["seed"] == 1234


def test_canvas_overrides_reach_primitives_and_titles(tmp_path):
    run(canvas_graph(), tmp_path, overrides=["how many.value=7", "My settings.seed=5"])
    show = [c for c in CALLS if c[0] == "ShowThing"][0]
    settings = [c for c in CALLS if c[0] == "Settings"][0][1]
    assert show[2] == 7 and settings["seed"] == 5


def test_canvas_defaults_fill_unsaved_widgets():
    canvas = {"nodes": [{"id": 1, "type": "Settings", "mode": 0},
                        {"id": 2, "type": "ShowThing", "mode": 0, "inputs": [{"name": "thing", "link": 1}]}],
              "links": [[1, 1, 0, 2, 0, "DB_THING"]]}
    prepared = runner.prepare_workflow(canvas, CLASSES, DISPLAY)
    assert prepared.prompt["1"]["inputs"] == {"prompt": "a photo", "seed": 0, "mode": "lora", "lr": 1e-4,
                                              "flag": True, "scheduler": "euler"}


def test_canvas_seed_without_control_value_and_old_bool_control():
    for values in (["p", 9, "full", 0.1, True, "ddim"], ["p", 9, True, "full", 0.1, True, "ddim"]):
        canvas = {"nodes": [{"id": 1, "type": "Settings", "mode": 0, "widgets_values": values}], "links": []}
        inputs = runner.prepare_workflow(canvas, CLASSES, DISPLAY).prompt["1"]["inputs"]
        assert inputs["seed"] == 9 and inputs["mode"] == "full" and inputs["scheduler"] == "ddim"


def test_canvas_link_from_muted_node_explains_missing_input(tmp_path):
    canvas = canvas_graph()
    canvas["nodes"][0]["mode"] = 2        # mute Settings: ShowThing loses its required input
    with pytest.raises(WorkflowValidationError, match=r"required input is missing \(its link comes from muted node 1\)"):
        run(canvas, tmp_path)


def test_canvas_core_nodes_are_named():
    canvas = canvas_graph()
    canvas["nodes"][6]["mode"] = 0        # un-mute the KSampler
    with pytest.raises(CoreNodesError, match=r"KSampler \(node 7\)"):
        runner.prepare_workflow(canvas, CLASSES, DISPLAY)


def test_canvas_subgraphs_are_refused():
    canvas = canvas_graph()
    canvas["definitions"] = {"subgraphs": [{"id": "abc"}]}
    with pytest.raises(WorkflowFormatError, match="subgraphs"):
        runner.prepare_workflow(canvas, CLASSES, DISPLAY)


# --- bad files -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON (line 1, column 2"),
    ("[1, 2]", "expected a JSON object, found a list"),
    ("{}", "the workflow is empty"),
    ('{"a": 1}', "neither an API-format prompt"),
])
def test_bad_workflow_files(tmp_path, content, message):
    path = tmp_path / "wf.json"
    path.write_text(content)
    with pytest.raises(WorkflowFormatError, match=message.replace("(", r"\(").replace("[", r"\[")):
        run(str(path), tmp_path)


def test_missing_workflow_file(tmp_path):
    with pytest.raises(WorkflowFormatError, match="workflow file not found"):
        run(str(tmp_path / "nope.json"), tmp_path)


def test_pack_mapping_is_the_default():
    assert isinstance(runner.pack_node_classes(), dict)


# --- the pack's own nodes, end to end on a tiny checkpoint --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_output_dir(tmp_path_factory):
    """An output dir whose checkpoints/ holds a tiny SD1 model (what --output-dir DIR gives LoadBaseModel)."""
    from comfyui_dreambooth.training.models import build_tiny_model, save_single_file

    out = tmp_path_factory.mktemp("pack_run") / "out"
    save_single_file(build_tiny_model("sd1", seed=0), str(out / "checkpoints" / "tiny.safetensors"), dtype="fp32")
    return out


def sample_api_graph():
    return {
        "1": {"class_type": "LoadBaseModel", "inputs": {"model": "tiny.safetensors", "prediction_type": "auto",
                                                        "dtype": "fp32"}},
        "2": {"class_type": "SampleTrained", "_meta": {"title": "Preview"},
              "inputs": {"model": ["1", 0], "prompt": "a photo of sks dog", "negative_prompt": "", "steps": 2,
                         "cfg": 5.0, "seed": 1, "width": 64, "height": 64, "batch_size": 2, "scheduler": "euler",
                         "clip_skip": 0, "filename_prefix": "db/test"}},
    }


def test_pack_nodes_run_headless(tiny_output_dir):
    from PIL import Image

    result = runner.run_workflow(sample_api_graph(), output_dir=tiny_output_dir, show_progress=False,
                                 overrides=["Preview.seed=4"])
    assert result["executed"] == ["1", "2"]
    images = result["results"]["2"][0][0]
    assert tuple(images.shape) == (2, 64, 64, 3) and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    files = runner.saved_files(result)
    assert [os.path.relpath(f, tiny_output_dir) for f in files] == ["db/test_00001_.png", "db/test_00002_.png"]
    assert Image.open(files[0]).size == (64, 64)


def test_pack_nodes_canvas_and_validation(tiny_output_dir):
    canvas = {
        "nodes": [
            {"id": 1, "type": "LoadBaseModel", "mode": 0, "outputs": [{"name": "model", "type": "DB_MODEL", "links": [1]}],
             "widgets_values": ["tiny.safetensors", "auto", "fp32", "", "(from checkpoint)"]},
            {"id": 2, "type": "SampleTrained", "mode": 0, "inputs": [{"name": "model", "type": "DB_MODEL", "link": 1}],
             "widgets_values": ["a photo", "", 1, 7.0, 0, "fixed", 64, 64, 1, "ddim", 0, "db/canvas"]},
        ],
        "links": [[1, 1, 0, 2, 0, "DB_MODEL"]],
    }
    result = runner.run_workflow(canvas, output_dir=tiny_output_dir, show_progress=False)
    assert [os.path.basename(f) for f in runner.saved_files(result)] == ["canvas_00001_.png"]

    with pytest.raises(WorkflowValidationError) as info:
        runner.run_workflow(sample_api_graph(), output_dir=tiny_output_dir, show_progress=False,
                            overrides=["LoadBaseModel.model=other.safetensors", "Preview.steps=0",
                                       "Preview.scheduler=heun"])
    text = str(info.value)
    assert text.startswith("3 validation errors")
    assert "input 'model': 'other.safetensors' is not a valid choice; expected one of 'tiny.safetensors'" in text
    assert "input 'steps': value 0 is smaller than the minimum 1" in text
    assert "input 'scheduler': 'heun' is not a valid choice" in text


EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "example_workflows").glob("*.json"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_workflows_convert_with_the_pack_nodes(path):
    """Examples made of this pack's nodes map onto their inputs (models need not exist); the ones that also use
    ComfyUI core nodes (they run inside ComfyUI only) get the clear error naming those nodes."""
    import json

    canvas = json.loads(path.read_text())
    classes = runner.pack_node_classes()
    core = sorted({n["type"] for n in canvas["nodes"]} - set(classes) - {"Note", "MarkdownNote", "Reroute",
                                                                         "PrimitiveNode"})
    if core:
        with pytest.raises(runner.CoreNodesError) as info:
            runner.prepare_workflow(str(path))
        assert all(name in str(info.value) for name in core)
        return
    prepared = runner.prepare_workflow(str(path))
    assert runner.output_node_ids(prepared.prompt, classes), "an example needs an output node"
    for node_id, node in prepared.prompt.items():
        types = classes[node["class_type"]].INPUT_TYPES()
        for name, spec in (types.get("required") or {}).items():
            assert name in node["inputs"], f"node {node_id} ({node['class_type']}) lacks {name}"


def test_seed_without_control_widget_is_not_followed_by_a_control_value():
    """DreamBoothSettings' seed has control_after_generate False: the frontend saves no control value after it,
    so a BOOLEAN widget right after the seed must not be taken for one."""
    from comfyui_dreambooth.runner import prepare_workflow

    class SeedThenBool:
        CATEGORY, FUNCTION, RETURN_TYPES, OUTPUT_NODE = "t", "run", (), True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 10, "control_after_generate": False}),
                                 "flag": ("BOOLEAN", {"default": False})}}

        def run(self, seed, flag):
            return ()

    canvas = {"nodes": [{"id": 1, "type": "SeedThenBool", "widgets_values": [3, True], "inputs": [], "outputs": []}],
              "links": []}
    prepared = prepare_workflow(canvas, node_classes={"SeedThenBool": SeedThenBool})
    assert prepared.prompt["1"]["inputs"] == {"seed": 3, "flag": True}


def test_save_lora_after_a_full_fine_tune_is_refused_by_the_whole_graph_check(tmp_path):
    """Issue 24.1: the demo's LoRA workflow with use_lora off trained the whole schedule, then SaveLoRA failed
    ("this model has no LoRA adapters"). The whole-graph validation refuses it before the first node runs."""
    from comfyui_dreambooth import demo

    out = tmp_path / "out"
    demo.make_tiny_checkpoint(str(out / "checkpoints" / demo.CHECKPOINT_NAME))
    images = tmp_path / "images"
    demo.make_concept_images(str(images), count=2)
    overrides = demo.demo_overrides(demo.CHECKPOINT_NAME, str(images)) + [f"{demo.SETTINGS}.use_lora=false"]
    with pytest.raises(WorkflowValidationError) as info:
        runner.run_workflow(demo.example_workflow_path(), overrides=overrides, output_dir=out, show_progress=False)
    text = str(info.value)
    assert text.startswith("1 validation error") and "SaveLoRA" in text and "use_lora" in text, text
    assert "SaveCheckpoint" in text and "\n" not in text, text
    assert not (out / "dreambooth").exists()            # nothing ran
