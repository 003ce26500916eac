"""Issue 21.4, the CPU proxy's resident memory: transients that set a low-memory CPU run's resident peak above
its training step's (README, "The CPU proxy"): a float32 copy of every bf16 trained weight at once when a
checkpoint is written, a float64 copy of the text encoder's largest tensor when the data cache fingerprints it, and
a new bf16 tensor per trained weight per step (fragmenting the heap). Each is checked on its mechanism: which
copies exist at once, how large, where the weights live."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Copies(TorchDispatchMode):
    """Records each dtype conversion's output (aten._to_copy): the most of them alive at once, and the largest."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype, self.alive, self.most_alive, self.largest = dtype, [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and out.dtype == self.dtype:
            self.alive = [r for r in self.alive if r() is not None] + [weakref.ref(out)]
            self.most_alive = max(self.most_alive, len(self.alive))
            self.largest = max(self.largest, out.numel())
        return out


def test_checkpoint_weights_become_float32_one_at_a_time(tmp_path):
    from safetensors.torch import load_file, save_file

    from comfyui_dreambooth.training.checkpoints import save_fp32_safetensors

    gen = torch.Generator().manual_seed(0)
    named = {f"unet.w{i}": torch.nn.Parameter(torch.randn(64, 32, generator=gen).to(torch.bfloat16))
             for i in range(6)}
    named |= {"unet.scalar": torch.tensor(0.5), "unet.t": torch.randn(5, 3, generator=gen).t(),
              "te0.h": torch.randn(7, generator=gen).half()}
    with _Copies(torch.float32) as copies:
        save_fp32_safetensors(named, str(tmp_path / "streamed.safetensors"))
    assert copies.most_alive == 1          # all at once (a dict of float32 copies) was 4 bytes per bf16 weight
    save_file({k: p.detach().float().contiguous() for k, p in named.items()}, str(tmp_path / "whole.safetensors"))
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    loaded = load_file(str(tmp_path / "streamed.safetensors"))
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], p.detach().float())
               for k, p in named.items())


def test_fingerprint_converts_a_large_tensor_a_chunk_at_a_time(monkeypatch):
    from comfyui_dreambooth.training.data import cache

    emb = torch.nn.Embedding(1000, 48)         # 48 000 elements: the shape of CLIP's token embedding, small
    torch.nn.init.normal_(emb.weight, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(cache, "FINGERPRINT_CHUNK", 4096)
    cache._fingerprint_memo.clear()
    with _Copies(torch.float64) as copies:
        chunked = cache.module_fingerprint(emb)
    assert copies.largest <= 4096          # was the whole tensor (and its abs: another)
    assert cache._abs_sum_float64(emb.weight.reshape(-1)).item() == pytest.approx(
        emb.weight.double().abs().sum().item(), rel=1e-12)
    with torch.no_grad():
        emb.weight[3, 3] += 1.0
    assert cache.module_fingerprint(emb) != chunked    # still a fingerprint of the weights


@pytest.mark.parametrize("fused", [False, True])
def test_bf16_weights_are_updated_in_their_own_storage(fused):
    from comfyui_dreambooth.training.settings import DreamBoothSettings
    from comfyui_dreambooth.training.setup.fused import PerParameterOptimizer

    settings = DreamBoothSettings(optimizer="Adafactor", learning_rate=1e-2, weights_dtype="bf16",
                                  mixed_precision="bf16", fused_backward=fused, max_grad_norm=0.0)
    layer = torch.nn.Linear(16, 8).to(torch.bfloat16)
    params = list(layer.parameters())
    where = [p.data_ptr() for p in params]
    before = [p.detach().clone() for p in params]
    opt = PerParameterOptimizer([{"params": params, "lr": 1e-2}], settings, fused=fused, seed=1)
    try:
        for _ in range(2):
            layer(torch.randn(4, 16, dtype=torch.bfloat16)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    finally:
        if hasattr(opt, "close"):
            opt.close()
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert not any(torch.equal(p.detach(), b) for p, b in zip(params, before))     # the weights did move
    assert [p.data_ptr() for p in params] == where     # a new tensor per weight per step fragmented the heap


def test_stochastic_rounding_into_the_weight_gives_the_same_bits():
    """The in-place form (out=) rounds exactly as the returning one: same draws, same bits (inf / -0 / subnormal
    too), so runs and resumes stay bit-identical to those made before it."""
    from comfyui_dreambooth.training.setup.fused import stochastic_round_to_bf16

    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 3
    x[:5] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1e-40])
    returned = stochastic_round_to_bf16(x, torch.Generator().manual_seed(5))
    out = torch.empty(10_000, dtype=torch.bfloat16)
    assert stochastic_round_to_bf16(x, torch.Generator().manual_seed(5), out=out) is out
    assert torch.equal(out.view(torch.int16), returned.view(torch.int16))
