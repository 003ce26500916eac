"""Pre-flight (training/preflight.py): one step at the largest bucket and batch is measured before training; a
step that would not fit stops the run before anything is trained or written, or with auto_fit applies the
wizard's next saving and tries again. On the CPU the device is simulated: its budget is set by the test and a
step's peak is what the estimator says for the settings being tried (training/memory.py)."""
from __future__ import annotations

import os

import pytest
import torch

from trainer_fixtures import make_concept, tiny_settings


@pytest.fixture
def simulated_device(monkeypatch):
    """A device with `budget` bytes whose step peak is the estimate of the settings tried; records each probe."""
    from comfyui_dreambooth.training import memory, preflight

    state = {"budget": None, "probes": [], "last": None}
    real_estimate = memory.estimate

    def recording_estimate(*args, **kwargs):
        state["last"] = real_estimate(*args, **kwargs)
        return state["last"]

    def measure(device, run_step):
        run_step()                                   # the real forward/backward runs
        est = state["last"]
        state["probes"].append(est.details)
        return est.total - est.parts["optimizer"]    # the trainer adds the optimizer state itself

    monkeypatch.setattr(memory, "estimate", recording_estimate)
    monkeypatch.setattr(preflight, "device_budget", lambda device: state["budget"])
    monkeypatch.setattr(preflight, "measure_step", measure)
    return state


def _budget_between(sd1, concept, settings):
    """A budget the settings do not fit but fit with gradient checkpointing on (the wizard's first saving)."""
    from comfyui_dreambooth.training.memory import estimate
    from comfyui_dreambooth.training.preflight import HEADROOM

    s = settings.resolved([concept])
    off, on = estimate(sd1, s).total, estimate(sd1, s.replace(gradient_checkpointing=True)).total
    assert on < off
    return int((on + off) / 2 / HEADROOM)


def _runs(root):
    folder = os.path.join(root, "dreambooth")
    return [d for d in os.listdir(folder) if os.path.exists(os.path.join(folder, d, "config.json"))] \
        if os.path.isdir(folder) else []


def test_a_step_that_does_not_fit_stops_before_training(sd1, tmp_path, simulated_device):
    from comfyui_dreambooth.training.preflight import DoesNotFit
    from comfyui_dreambooth.training.trainer import train

    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(batch_size=2)
    simulated_device["budget"] = _budget_between(sd1, concept, settings)
    with pytest.raises(DoesNotFit) as info:
        train(sd1, [concept], settings, output_root=str(tmp_path / "out"))
    text = str(info.value)
    assert text.startswith("pre-flight on cpu: one training step at the largest bucket 64x64 with batch 2 needs ")
    assert "Nothing was trained" in text
    assert "next saving: gradient_checkpointing on" in text and "auto_fit" in text
    assert "estimate of these settings:" in text and "total" in text
    assert _runs(tmp_path / "out") == []                  # no run folder, no checkpoint: nothing started
    assert len(simulated_device["probes"]) == 1


@pytest.mark.slow
def test_auto_fit_applies_the_next_saving_and_trains(sd1, tmp_path, simulated_device):
    from comfyui_dreambooth.training.trainer import TrainCallbacks, train

    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(batch_size=2, auto_fit=True)
    simulated_device["budget"] = _budget_between(sd1, concept, settings)
    logs = []
    result = train(sd1, [concept], settings, output_root=str(tmp_path / "out"), callbacks=TrainCallbacks(log=logs.append))
    assert result.info["settings"]["gradient_checkpointing"] is True
    assert any("auto_fit turns on gradient_checkpointing on" in line for line in logs), logs
    assert any(line.startswith("pre-flight: one step at 64x64, batch 2 needs") for line in logs), logs
    assert len(simulated_device["probes"]) == 2 and len(_runs(tmp_path / "out")) == 1


@pytest.mark.slow
def test_the_probe_uses_the_largest_bucket_with_a_full_batch(sd1, tmp_path, simulated_device):
    from PIL import Image

    from comfyui_dreambooth.training.data.prepare import prepare_training_data
    from comfyui_dreambooth.training.trainer import train

    concept = make_concept(tmp_path, n=1)
    Image.new("RGB", (256, 64), (200, 30, 30)).save(os.path.join(concept.instance_dir, "wide.png"))
    settings = tiny_settings(batch_size=3, steps_per_image=0, max_train_steps=1,     # the probe is what counts
                             data=dict(resolution=128, bucket_min_side=64, bucket_max_side=256))
    data = prepare_training_data(sd1, [concept], settings.resolved([concept]).data, cache_dir=str(tmp_path / "c"),
                                 text_encoder_trained=False, batch_size=3)
    buckets = {item.bucket for item in data.items}
    assert len(buckets) == 2
    largest = data.largest_batch_plan()
    assert largest.bucket == max(buckets, key=lambda b: b[0] * b[1])
    assert len(largest.items) == 3                        # a full batch although no bucket holds 3 images
    assert {data.items[i].bucket for i in largest.items} == {largest.bucket}

    simulated_device["budget"] = 10 * 2**30
    train(sd1, [concept], settings, output_root=str(tmp_path / "out"))
    (probe,) = simulated_device["probes"]
    assert probe["batch"] == 3 and probe["resolution"] == max(largest.bucket)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused_backward"])
def test_the_probe_leaves_training_bit_identical(sd1, tmp_path, simulated_device, fused):
    from comfyui_dreambooth.training.trainer import train

    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(fused_backward=fused, max_grad_norm=0.0 if fused else 1.0, lora_dropout=0.1)
    simulated_device["budget"] = None                     # no pre-flight (the CPU)
    plain = train(sd1, [concept], settings, output_root=str(tmp_path / "a"))
    simulated_device["budget"] = 10 * 2**30               # pre-flight that fits
    probed = train(sd1, [concept], settings, output_root=str(tmp_path / "b"))
    assert len(simulated_device["probes"]) == 1
    a, b = plain.model.unet.state_dict(), probed.model.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_several_processes_skip_the_fused_backward_saving():
    """fused_backward steps each weight before gradients are averaged, so several processes refuse it: auto_fit
    must go on to the next saving instead of choosing a setting the run then rejects."""
    from comfyui_dreambooth.training.preflight import next_saving

    s = tiny_settings(use_lora=False, gradient_checkpointing=True, optimizer="Adafactor")
    one_text, one = next_saving(s, images=4)
    assert one.fused_backward and "fused_backward" in one_text
    many_text, many = next_saving(s, images=4, processes=2)
    assert many is not None and not many.fused_backward and "fused_backward" not in many_text


@pytest.mark.slow
def test_auto_fit_frees_the_failed_attempt_before_the_next_probe(sd1, tmp_path, simulated_device, monkeypatch):
    """The next attempt's probe must not count the failed attempt's copy of the UNet and its optimizer state
    (a DoesNotFit's traceback holds them: on a GPU the retry would measure both and never fit)."""
    import gc
    import weakref

    from comfyui_dreambooth.training import trainer

    attempts = []
    real_build = trainer._build_model

    def recording_build(job):
        real_build(job)
        attempts.append(weakref.ref(job.tm.unet))
    monkeypatch.setattr(trainer, "_build_model", recording_build)
    alive_at_probe = []
    from comfyui_dreambooth.training import preflight

    measure = preflight.measure_step       # the simulated device's

    def checking_measure(device, run_step):
        alive_at_probe.append([ref() is not None for ref in attempts[:-1]])
        return measure(device, run_step)
    monkeypatch.setattr(preflight, "measure_step", checking_measure)
    gc.disable()                     # only the trainer's own collection may free the cycle
    try:
        concept = make_concept(tmp_path, n=2)
        settings = tiny_settings(use_lora=False, batch_size=2, auto_fit=True)
        simulated_device["budget"] = _budget_between(sd1, concept, settings)
        trainer.train(sd1, [concept], settings, output_root=str(tmp_path / "out"))
    finally:
        gc.enable()
    assert alive_at_probe == [[], [False]]     # the first attempt's UNet copy was gone when the second probed
