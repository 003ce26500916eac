"""training/memory_measure.py (issue 21): the accounting of one real training step on fake tensors. On the tiny
models it reproduces exactly the parts the estimator computes exactly (weights, gradients, optimizer state, EMA),
a memory-saving setting shows its saving, and nothing of it is part of a training run."""
import ast
from pathlib import Path

import pytest

from trainer_fixtures import tiny_settings

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "lora-adamw": dict(use_lora=True, optimizer="AdamW"),
    "lora-te-adamw": dict(use_lora=True, optimizer="AdamW", text_encoder_ratio=0.5),
    "full-adamw": dict(use_lora=False, optimizer="AdamW"),
    "full-te-sgd": dict(use_lora=False, optimizer="SGD", text_encoder_ratio=0.5),
    "full-ema": dict(use_lora=False, optimizer="AdamW", use_ema=True),
    "full-bf16-fused-adafactor": dict(use_lora=False, optimizer="Adafactor", weights_dtype="bf16",
                                      mixed_precision="bf16", fused_backward=True, max_grad_norm=0.0),
}


def _measure(model, **changes):
    from comfyui_dreambooth.training.memory import estimate
    from comfyui_dreambooth.training.memory_measure import measure

    settings = tiny_settings(**changes)
    return measure(model, settings, loaded_dtype="fp32"), estimate(model, settings)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_accounting_reproduces_the_exact_parts(sd1, case):
    m, est = _measure(sd1, **CASES[case])
    e = est.parts
    assert sum(m.resident.values()) == e["weights"] + e["text_encoders"] + e["vae"]
    if CASES[case].get("weights_dtype") == "bf16" and CASES[case].get("fused_backward"):
        # each bf16 gradient becomes an fp32 update inside the hook (counted with the optimizer's temporaries)
        assert 0 < m.each_peak["grad"] <= est.details["gradients_held"]
    else:
        assert m.each_peak["grad"] == est.details["gradients_held"]
    assert m.held["optimizer"] == est.details["optimizer_held"]
    assert m.held["ema"] == e["ema"]
    assert m.peak_at and m.total == max(m.stages.values())


@pytest.mark.slow
def test_received_unet_is_booked_off_the_accelerator(sd1):
    """A full fine-tune trains a copy: the received UNet leaves the accelerator (counted as the host's)."""
    m, _ = _measure(sd1, use_lora=False)
    unet = sum(p.numel() * 4 for p in sd1.unet.parameters())
    assert m.host >= unet
    assert m.resident["unet"] == unet        # the trained copy only


@pytest.mark.parametrize("saving, expect", [
    (dict(fused_backward=True, max_grad_norm=0.0, mixed_precision="bf16"), "grad"),
    (dict(gradient_checkpointing=True), "act"),
    (dict(weights_dtype="bf16", mixed_precision="bf16"), "param"),
    (dict(optimizer="Adafactor"), "opt"),
])
@pytest.mark.slow
def test_a_saving_shows_in_the_accounting(sd1, saving, expect):
    base = dict(use_lora=False, optimizer="AdamW", mixed_precision="bf16" if "mixed_precision" in saving else "no")
    before, _ = _measure(sd1, **base)
    after, _ = _measure(sd1, **(base | saving))
    assert after.each_peak[expect] < before.each_peak[expect]
    assert after.total < before.total


def test_nothing_of_the_accounting_runs_in_training():
    """Only the accounting itself (and the CLI / benchmarks that call it) imports it, FakeTensorMode or
    MemTracker; outside it the CPU is no accelerator and to_host really moves."""
    import torch

    from comfyui_dreambooth.training.devices import is_accelerator, to_host

    offenders = []
    for path in [*ROOT.glob("training/**/*.py"), *ROOT.glob("nodes/**/*.py"), *ROOT.glob("runner/**/*.py")]:
        if path.name == "memory_measure.py":
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any("memory_measure" in n or "mem_tracker" in n or "fake_tensor" in n for n in names):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    assert not is_accelerator(torch.device("cpu")) and is_accelerator(torch.device("meta"))
    module = torch.nn.Linear(2, 2).to(torch.float16)
    assert to_host(module) is module and module.weight.device.type == "cpu"


@pytest.mark.slow
def test_bf16_trained_copy_is_made_without_a_full_precision_copy(sd1):
    """Issue 21.4: weights_dtype bf16 copied the UNet in full precision, then cast it (a transient fp32 copy:
    4 bytes per UNet parameter above the run's steady state on a CPU). Accounted as a CPU run: the build
    stage holds the received model and the bf16 copy only."""
    from comfyui_dreambooth.training.memory_measure import measure

    settings = tiny_settings(use_lora=False, weights_dtype="bf16", mixed_precision="bf16", fused_backward=True,
                             max_grad_norm=0.0, optimizer="Adafactor")
    m = measure(sd1, settings, loaded_dtype="fp32", on_cpu=True)
    received = sum(t.numel() * t.element_size() for mod in sd1.modules() for t in (*mod.parameters(),
                                                                                    *mod.buffers()))
    unet = sum(p.numel() for p in sd1.unet.parameters())
    # the bf16 copy (2 bytes per parameter) and small parts (the noise schedule's tables, the data's VAE copy) stay
    # well under the 2 + 4 bytes a full-precision copy before the cast took
    assert m.stages["building the trained model"] < received + 3 * unet


@pytest.mark.slow
def test_cli_estimate_measure_json(capsys, monkeypatch, sd1):
    """`estimate MODEL --measure --json`: the estimate's JSON plus measured_gb / measured_by (the accounting of
    the tiny model here; sd15 / sd2 / sdxl take minutes: bench/memory.py --accounting)."""
    import json

    from comfyui_dreambooth import cli

    monkeypatch.setattr(cli, "_memory_model", lambda spec: sd1)
    code = cli.main(["estimate", "tiny", "--measure", "--json", "--set", "resolution=64"])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(out.out)
    assert data["measured_by"] == "fake tensors, CPU kernels"
    assert {"weights", "gradients", "optimizer", "activations", "temporaries", "total"} <= set(data["measured_gb"])
    assert data["measured_gb"]["total"] > 0 and data["measured_peak_at"]
    assert {"settings", "estimate_gb", "explanation"} <= set(data)
    code = cli.main(["estimate", "tiny", "--measure", "--set", "resolution=64"])
    out = capsys.readouterr()
    assert code == 0 and "Accounted" in out.out and "peak" in out.out
