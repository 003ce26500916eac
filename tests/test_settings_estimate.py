"""The settings nodes' memory_estimate output (issue 12 point 4): the estimate of the config each node produces,
for the connected model (SD1.5 without one), compared with the device, a WARNING when it does not fit, and never
a failed node because of the estimate. Also the CLI's `estimate`, which prints the same report."""
import re

import pytest

from comfyui_dreambooth.nodes import NODE_CLASS_MAPPINGS
from comfyui_dreambooth.training import devices, memory
from comfyui_dreambooth.training.devices import GB, DeviceMemory
from comfyui_dreambooth.training.memory import estimate
from comfyui_dreambooth.training.settings import DreamBoothSettings

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS_NODES = ("DreamBoothSettings", "DreamBoothOptimizer", "DreamBoothAdvanced", "DreamBoothData",
                  "DreamBoothImagic", "DreamBoothValidation")


def widget_defaults(cls):
    return {name: spec[1]["default"] for name, spec in cls.INPUT_TYPES()["required"].items()}


def run_node(name, **changes):
    cls = NODE_CLASS_MAPPINGS[name]
    inputs = {**widget_defaults(cls), **changes}
    return getattr(cls(), cls.FUNCTION)(**inputs)


def total_in(text: str) -> float:
    (found,) = re.findall(r"^total\s+([0-9.]+) GB$", text, flags=re.M)
    return float(found)


@pytest.fixture
def device(monkeypatch):
    """Pretend the detected device has `gb` GB (set device.gb); None = no accelerator."""
    class Fake:
        gb = None

    fake = Fake()
    monkeypatch.setattr(devices, "device_memory", lambda d: None if fake.gb is None else DeviceMemory(
        "cuda:0 (Fake GPU)", int(fake.gb * GB), int(fake.gb * GB * 0.9)))
    return fake


def test_every_settings_node_returns_its_config_and_the_estimate(device):
    device.gb = 80
    for name in SETTINGS_NODES:
        cls = NODE_CLASS_MAPPINGS[name]
        assert cls.RETURN_TYPES == ("DB_CONFIG", "STRING") and cls.RETURN_NAMES[-1] == "memory_estimate"
        spec = cls.INPUT_TYPES()["optional"]["model"]
        assert spec[0] == "DB_MODEL" and spec[1]["tooltip"]
        out = run_node(name)
        config, text = out["result"]
        assert out["ui"] == {"text": [text]}
        assert config == cls().build(**widget_defaults(cls))[0] == DreamBoothSettings()
        assert total_in(text) == pytest.approx(round(estimate("sd15", config).total / GB, 2))


def test_the_estimate_follows_the_nodes_own_config(device):
    device.gb = 80
    base = run_node("DreamBoothSettings", use_lora=False, batch_size=2)["result"][0]
    config, text = run_node("DreamBoothData", config=base, resolution=768)["result"]
    assert config.data.resolution == 768 and config.batch_size == 2 and not config.use_lora
    assert total_in(text) == pytest.approx(round(estimate("sd15", config, 768, 2).total / GB, 2))
    assert "full fine-tune" in text and "768px, batch 2" in text


def test_no_model_estimates_sd15_and_says_so(device):
    text = run_node("DreamBoothSettings")["result"][1]
    assert "SD1.5" in text and "no model connected" in text and "connect the base model" in text


def test_a_connected_model_gives_its_own_numbers(device, sd1):
    device.gb = 80
    config, text = run_node("DreamBoothSettings", model=sd1)["result"]
    assert "no model connected" not in text and "SD1.x model" in text
    assert total_in(text) == pytest.approx(round(estimate(sd1, config).total / GB, 2))
    assert total_in(text) < total_in(run_node("DreamBoothSettings")["result"][1])    # tiny model < SD1.5


def test_a_small_device_gets_a_warning_and_a_large_one_does_not(device):
    full = {"use_lora": False}
    device.gb = 4
    text = run_node("DreamBoothSettings", **full)["result"][1]
    first = text.splitlines()[0]
    assert first.startswith("WARNING")
    total = estimate("sd15", DreamBoothSettings(use_lora=False)).total / GB
    assert f"{total:.2f} GB" in first and "4.00 GB" in first and "Fake GPU" in first
    assert "optimizer" in first and "Performance Wizard" in first and "comfyui-dreambooth wizard" in first
    device.gb = 80
    text = run_node("DreamBoothSettings", **full)["result"][1]
    assert "WARNING" not in text and "fits" in text and "80.00 GB" in text


def test_close_to_the_limit_is_called_tight(device):
    total = estimate("sd15", DreamBoothSettings()).total / GB
    device.gb = total / 0.95
    text = run_node("DreamBoothSettings")["result"][1]
    assert "WARNING" not in text and "tight" in text


def test_without_an_accelerator_no_warning(device):
    device.gb = None
    text = run_node("DreamBoothSettings", use_lora=False)["result"][1]
    assert "WARNING" not in text and "no accelerator found" in text and "total" in text


def test_on_this_cpu_the_real_device_check_finds_no_accelerator():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert devices.device_memory("cpu") is None
    assert "no accelerator found" in run_node("DreamBoothSettings")["result"][1]


def test_an_estimate_that_raises_still_returns_the_config(device, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("meta device unavailable")

    monkeypatch.setattr(memory, "estimate", broken)
    out = run_node("DreamBoothAdvanced", gradient_checkpointing=False)
    config, text = out["result"]
    assert isinstance(config, DreamBoothSettings) and config.gradient_checkpointing is False
    assert text.startswith("No memory estimate") and "meta device unavailable" in text
    assert out["ui"] == {"text": [text]}


def test_a_device_that_cannot_be_read_still_shows_the_estimate(monkeypatch):
    def broken(device):
        raise RuntimeError("CUDA error: busy")

    monkeypatch.setattr(devices, "device_memory", broken)
    text = memory.settings_estimate_text(None, DreamBoothSettings(), "cuda")
    assert "could not be read" in text and "CUDA error: busy" in text and "total" in text
    assert "WARNING" not in text


def test_invalid_settings_still_fail_the_node():
    from comfyui_dreambooth.training.settings import SettingsError

    with pytest.raises(SettingsError):
        run_node("DreamBoothSettings", run_name="../x")


# ---- the CLI prints the same report ------------------------------------------------------------------------------
def test_cli_estimate_prints_the_report(capsys, device):
    from comfyui_dreambooth import cli

    assert cli.main(["estimate", "sd15", "--set", "use_lora=false", "--vram", "4"]) == 0
    out = capsys.readouterr().out
    settings = DreamBoothSettings(use_lora=False)
    assert out.strip() == memory.estimate_report("sd15", settings, DeviceMemory("a 4 GB card", 4 * GB)).strip()
    assert out.startswith("WARNING")
    assert cli.main(["estimate", "sd15", "--vram", "80"]) == 0
    assert "WARNING" not in capsys.readouterr().out
    device.gb = 3
    assert cli.main(["estimate", "sd15"]) == 0          # the detected device
    out = capsys.readouterr().out
    assert out.startswith("WARNING") and "Fake GPU" in out


def test_cli_workflow_with_a_model_linked_to_a_settings_node(capsys, tmp_path):
    import json

    from comfyui_dreambooth import cli

    cls = NODE_CLASS_MAPPINGS["DreamBoothSettings"]
    prompt = {"1": {"class_type": "LoadBaseModel", "inputs": {"model": "x.safetensors"}},
              "2": {"class_type": "DreamBoothSettings",
                    "inputs": {**widget_defaults(cls), "use_lora": False, "model": ["1", 0]}}}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(prompt))
    assert cli.main(["estimate", "sd15", "--workflow", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["use_lora"] is False


def test_an_intermediate_node_says_its_estimate_is_of_the_settings_so_far():
    """Issue 23.5: earlier settings nodes of a chain showed the estimate of an intermediate config, nothing saying
    so. ComfyUI hands each node its id and the queued graph: a node whose config feeds another settings node says
    which one changes it; the last one (what trains) shows its estimate alone."""
    prompt = {"3": {"class_type": "DreamBoothData", "inputs": {}},
              "4": {"class_type": "DreamBoothSettings", "inputs": {"config": ["3", 0]}},
              "5": {"class_type": "TrainDreamBooth", "inputs": {"config": ["4", 0], "model": ["1", 0]}},
              "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 1]}}}
    first = run_node("DreamBoothData", unique_id="3", prompt=prompt)
    assert first["ui"]["text"][0].startswith("(settings so far: DreamBoothSettings #4 changes them after this node")
    assert first["result"][1] == first["ui"]["text"][0]
    last = run_node("DreamBoothSettings", unique_id="4", prompt=prompt)
    assert not last["ui"]["text"][0].startswith("(settings so far")      # its memory_estimate feeds no settings
    alone = run_node("DreamBoothSettings")
    assert not alone["ui"]["text"][0].startswith("(settings so far")
    for name in SETTINGS_NODES:
        assert NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["hidden"] == {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}
