"""Opt-in (COMFYUI_DIR = a ComfyUI checkout; COMFYUI_PYTHON = its Python, default ../venv): the pack inside a real
ComfyUI server started with `main.py --cpu --listen 127.0.0.1`.

Checks /object_info (every pack node, display names, categories, descriptions, tooltips), the example workflows
and the web extension being served, then queues through /prompt (API format) and waits on /history:
  * the demo graph (the LoRA example with demo.py's overrides, on the tiny model): samples written, the LoRA lands in
    models/loras and loads;
  * 'Train a LoRA then generate with core nodes' on an SD 1.5-shaped model: training + SaveLoRA first, then the core nodes
    (CheckpointLoaderSimple + LoraLoader + KSampler ...) with that LoRA, and no "lora key not loaded" in the log;
  * 'Train and generate in one graph': DreamBoothToComfy feeding KSampler in the same run.
With chromium installed, every example is also loaded into ComfyUI's real frontend: it must keep every widget value
and link as saved, and its own API conversion (graphToPrompt) must equal the runner's.
About 1.5 minutes on 2 CPU cores (the SD 1.5-shaped model has a 100M-parameter UNet and the real CLIP-L / VAE).

Setup once (a ComfyUI checkout + a venv with ComfyUI's and this pack's requirements; comfyui_up.sh builds both on
CPU, then stop the server it starts):
    MIRROR=<bare clone of Comfy-Org/ComfyUI> WORK=/tmp/comfy PACK=<this checkout> bash comfyui_up.sh
    WORK=/tmp/comfy bash comfyui_up.sh stop
    COMFYUI_DIR=/tmp/comfy/ComfyUI pytest tests/test_real_comfyui.py tests/test_convert_node.py
The test starts its own server on a free port with --base-directory in a temporary folder (custom_nodes/ holds a
link to this checkout; models/, input/, output/ are the test's), so the ComfyUI checkout is not written to.
"""
import json
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

import comfyui_env
import make_example_workflows as make
import workflow_tools as wt
from sd15_shaped import save_sd15_shaped_checkpoint

pytestmark = pytest.mark.skipif(not comfyui_env.comfyui_dir(), reason=comfyui_env.skip_reason())

EXAMPLES = Path(comfyui_env.REPO_ROOT) / "example_workflows"
SD15 = "sd15_shaped.safetensors"
CONCEPT = "demo_concept"                      # relative: resolved in ComfyUI's input folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from comfyui_dreambooth import demo
    from real_comfyui.server import ComfyServer

    base = tmp_path_factory.mktemp("comfy_base")
    comfyui_env.link_pack(str(base / "custom_nodes"))
    demo.make_tiny_checkpoint(str(base / "models" / "checkpoints" / demo.CHECKPOINT_NAME))
    save_sd15_shaped_checkpoint(str(base / "models" / "checkpoints" / SD15))
    demo.make_concept_images(str(base / "input" / CONCEPT))
    # the file names the examples ship with, so the frontend's model lists hold them (empty: never loaded)
    (base / "models" / "checkpoints" / make.BASE_MODEL).write_bytes(b"")
    (base / "models" / "loras" / "dreambooth").mkdir(parents=True)
    (base / "models" / "loras" / (make.PERSON_LORA + ".safetensors")).write_bytes(b"")
    comfy = ComfyServer(comfyui_env.comfyui_dir(), comfyui_env.comfyui_python(), str(base)).start()
    try:
        yield comfy
    finally:
        comfy.stop()


def api_prompt(workflow: str, overrides: list[str]) -> dict:
    """Canvas -> API format (the runner's converter; core nodes through stand-ins) with --set style overrides."""
    from comfyui_dreambooth import runner

    classes = {**wt.core_node_classes(), **runner.pack_node_classes()}
    prepared = runner.prepare_workflow(str(EXAMPLES / workflow), node_classes=classes,
                                       display_names=runner.pack_display_names(), overrides=overrides)
    return prepared.prompt


def node_ids(prompt: dict, class_type: str) -> list[str]:
    return [i for i, n in prompt.items() if n["class_type"] == class_type]


def sd15_overrides() -> list[str]:
    """The LoRA training chain of the core-node examples, shrunk for a CPU: 64 px, 4 steps, no class images."""
    return ["Base model.model=" + SD15, "Concept.instance_dir=" + CONCEPT, "Concept.num_class_images_per_image=0",
            "Data.resolution=64", "Data.bucketing=false", "Settings.steps_per_image=1", "Settings.lora_rank=4",
            "Settings.lora_alpha=4", "Settings.mixed_precision=no", "Settings.lr_warmup_steps=0",
            "Settings.save_every_epochs=0", "Settings.preview_every_epochs=0", "Settings.run_name=sd15_shaped",
            "EmptyLatentImage.width=64", "EmptyLatentImage.height=64", "KSampler.steps=2"]


# ------------------------------------------------------------------------------------------------------------------
def test_pack_imports_cleanly(server):
    log = server.log_text()
    bad = [line for line in log.splitlines()
           if ("IMPORT FAILED" in line or "Cannot import" in line) and "comfyui_dreambooth" in line]
    assert not bad, "\n".join(bad)


def test_object_info_lists_every_pack_node(server):
    from comfyui_dreambooth import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    info = server.get("/object_info")
    problems = []
    for name in NODE_CLASS_MAPPINGS:
        node = info.get(name)
        if node is None:
            problems.append(f"{name}: missing from /object_info")
            continue
        if node["display_name"] != NODE_DISPLAY_NAME_MAPPINGS[name]:
            problems.append(f"{name}: display name {node['display_name']!r}")
        if not node["category"].startswith("DreamBooth"):
            problems.append(f"{name}: category {node['category']!r}")
        if not node.get("description"):
            problems.append(f"{name}: no description")
        if not node["python_module"].endswith("comfyui_dreambooth"):
            problems.append(f"{name}: python_module {node['python_module']!r}")
        for section in ("required", "optional"):
            for input_name, spec in (node["input"].get(section) or {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not options.get("tooltip"):
                    problems.append(f"{name}.{input_name}: no tooltip")
    assert not problems, "\n".join(problems)


def test_example_workflows_and_web_extension_are_served(server):
    templates = server.get("/workflow_templates")
    shipped = sorted(p.stem for p in EXAMPLES.glob("*.json"))
    assert sorted(templates.get("comfyui_dreambooth", [])) == shipped
    name = make.LORA_PERSON_PRIOR_PRESERVATION + ".json"
    served = server.get("/api/workflow_templates/comfyui_dreambooth/" + urllib.parse.quote(name))
    assert served == json.loads((EXAMPLES / name).read_text())
    extensions = server.get("/extensions")
    assert any(e.startswith("/extensions/comfyui_dreambooth/") and e.endswith(".js") for e in extensions), extensions


def test_demo_graph_through_prompt(server):
    from comfyui_dreambooth import demo
    from comfyui_dreambooth.training.export.lora import load_kohya_lora

    prompt = api_prompt(demo.DEMO_WORKFLOW, demo.demo_overrides(demo.CHECKPOINT_NAME, CONCEPT))
    entry = server.run(prompt, timeout=900)
    sample_id = node_ids(prompt, "SampleTrained")[0]
    samples = server.output_files(entry, sample_id)
    assert len(samples) == 2 and all(os.path.isfile(p) for p in samples), samples
    lora = Path(server.base_dir) / "models" / "loras" / (demo.LORA_NAME + ".safetensors")
    assert lora.is_file()
    state, metadata = load_kohya_lora(str(lora))
    assert any(k.startswith("lora_unet_") for k in state) and metadata["ss_network_dim"] == "4"
    train_id = node_ids(prompt, "TrainDreamBooth")[0]
    assert entry["outputs"][train_id]["text"][0].startswith(("Trained", "Reused"))
    runs = list((Path(server.base_dir) / "output" / "dreambooth").glob("demo-*/loss.jsonl"))
    assert runs and runs[0].read_text().strip()


def test_core_nodes_generate_with_the_trained_lora(server):
    prompt = api_prompt(make.TRAIN_THEN_GENERATE_CORE_NODES + ".json", sd15_overrides() + ["Load checkpoint.ckpt_name=" + SD15])
    core = set(wt.CORE_NODES)
    # 1. train + save (the core nodes would be refused until the LoRA file exists)
    training_only = {i: n for i, n in prompt.items() if n["class_type"] not in core}
    server.run(training_only, timeout=1200)
    from comfyui_dreambooth.training.export.lora import load_kohya_lora

    lora_name = prompt[node_ids(prompt, "LoraLoader")[0]]["inputs"]["lora_name"]
    state, _ = load_kohya_lora(str(Path(server.base_dir) / "models" / "loras" / lora_name))   # replaced the placeholder
    assert any(k.startswith("lora_unet_") for k in state) and any(k.startswith("lora_te_") for k in state)
    # 2. the whole graph: training is cached (same inputs), the core nodes load the LoRA and sample
    log_start = len(server.log_text())
    entry = server.run(prompt, timeout=900)
    images = server.output_files(entry, node_ids(prompt, "SaveImage")[0])
    assert len(images) == 1 and os.path.isfile(images[0])
    new_log = server.log_text()[log_start:]
    assert "lora key not loaded" not in new_log, new_log[-3000:]
    assert "ERROR" not in new_log, new_log[-3000:]


def test_same_graph_conversion_feeds_ksampler(server):
    prompt = api_prompt(make.TRAIN_THEN_GENERATE_SAME_GRAPH + ".json", sd15_overrides())
    entry = server.run(prompt, timeout=1200)
    images = server.output_files(entry, node_ids(prompt, "SaveImage")[0])
    assert len(images) == 1 and os.path.isfile(images[0])


@pytest.mark.skipif(not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")),
                    reason="chromium is not installed")
def test_frontend_loads_examples_unchanged_and_converts_them_like_the_runner(server, tmp_path):
    from comfyui_dreambooth import runner

    names = sorted(p.stem for p in EXAMPLES.glob("*.json"))
    out = tmp_path / "frontend.json"
    probe = Path(__file__).resolve().parent / "real_comfyui" / "frontend_probe.py"
    done = subprocess.run([comfyui_env.comfyui_python(), str(probe), server.url, str(out), *names],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    seen = json.loads(out.read_text())
    classes = {**wt.core_node_classes(), **runner.pack_node_classes()}
    problems = []
    for name in names:
        saved = json.loads((EXAMPLES / f"{name}.json").read_text())
        saved_nodes = {n["id"]: n for n in saved["nodes"]}
        for node in seen[name]["serialized"]["nodes"]:
            original = saved_nodes[node["id"]]
            if node.get("widgets_values") != original["widgets_values"]:
                problems.append(f"{name} node {node['id']}: frontend widgets {node.get('widgets_values')} != "
                                f"saved {original['widgets_values']}")
            linked = [(i["name"], i["link"]) for i in node.get("inputs", []) if i.get("link") is not None]
            if linked != [(i["name"], i["link"]) for i in original["inputs"] if i.get("link") is not None]:
                problems.append(f"{name} node {node['id']}: links {linked}")
        ours = runner.prepare_workflow(str(EXAMPLES / f"{name}.json"), node_classes=classes).prompt
        theirs = seen[name]["prompt"]
        if {k: v["inputs"] for k, v in ours.items()} != {k: v["inputs"] for k, v in theirs.items()}:
            problems.append(f"{name}: frontend prompt {json.dumps(theirs)[:1500]} != runner's {json.dumps(ours)[:1500]}")
    assert not problems, "\n".join(problems)
