"""Opt-in CUDA checks of the setup helpers' device-crossing paths (skipped without a GPU):
EMA kept on the CPU for a GPU model, CPU-generator noise identical on every device, 8-bit optimizer state."""
import pytest
import torch

from comfyui_dreambooth.training.settings import DreamBoothSettings
from comfyui_dreambooth.training.setup.ema import EMA
from comfyui_dreambooth.training.setup.noise import sample_noise, sample_timesteps
from comfyui_dreambooth.training.setup.optimizers import build_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_ema_on_cpu_follows_a_gpu_model():
    torch.manual_seed(0)
    gpu = torch.nn.Linear(64, 64).cuda()
    cpu_twin = torch.nn.Linear(64, 64)
    cpu_twin.load_state_dict({k: v.cpu() for k, v in gpu.state_dict().items()})
    on_cpu, reference = EMA(gpu, 0.9, on_cpu=True), EMA(cpu_twin, 0.9)
    assert all(s.device.type == "cpu" for s in on_cpu.shadow.values())
    for step in range(3):
        with torch.no_grad():
            delta = torch.randn(64, 64, generator=torch.Generator().manual_seed(step))
            gpu.weight.add_(delta.cuda())
            cpu_twin.weight.add_(delta)
        on_cpu.step(gpu)
        reference.step(cpu_twin)
    torch.testing.assert_close(on_cpu.shadow["weight"], reference.shadow["weight"])
    averaged = on_cpu.averaged_copy(gpu)
    assert averaged.weight.device.type == "cuda"
    torch.testing.assert_close(averaged.weight.cpu(), on_cpu.shadow["weight"])


def test_cpu_generator_noise_is_the_same_on_the_gpu():
    latents_cpu = torch.zeros(2, 4, 16, 16)
    latents_gpu = latents_cpu.cuda().half()
    a = sample_noise(latents_cpu, 0.1, torch.Generator().manual_seed(3))
    b = sample_noise(latents_gpu, 0.1, torch.Generator().manual_seed(3))
    assert b.device.type == "cuda" and b.dtype == torch.float16
    torch.testing.assert_close(b.float().cpu(), a, atol=2e-3, rtol=1e-3)

    class Sched:
        class config:
            num_train_timesteps = 1000
    t = sample_timesteps(Sched, 8, torch.Generator().manual_seed(1), "cuda")
    assert t.device.type == "cuda" and torch.equal(t.cpu(), sample_timesteps(Sched, 8, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit"])
def test_8bit_state_on_the_gpu(name):
    pytest.importorskip("bitsandbytes")
    layer = torch.nn.Linear(256, 256).cuda()
    opt = build_optimizer(layer.parameters(), DreamBoothSettings(optimizer=name, learning_rate=1e-3))
    layer(torch.randn(4, 256, device="cuda")).pow(2).mean().backward()
    opt.step()
    assert opt.state[layer.weight]["state1"].dtype == torch.uint8
