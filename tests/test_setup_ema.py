"""EMA: decay math with its warm-up ramp, differs from the raw weights, CPU storage, resume, copy/apply."""
import copy

import pytest
import torch

from comfyui_dreambooth.training.setup.ema import EMA


def _module():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    m[1].requires_grad_(False)         # frozen parameters are not averaged
    return m


def _perturb(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))


def test_decay_math():
    m = _module()
    ema = EMA(m, decay=0.9)
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    expected = {k: v.clone() for k, v in ema.shadow.items()}
    decays = []
    for i in range(6):
        _perturb(m, i)
        d = ema.current_decay()
        decays.append(d)
        ema.step(m)
        for name, p in m.named_parameters():
            if name in expected:
                expected[name] = d * expected[name] + (1 - d) * p.detach()
                torch.testing.assert_close(ema.shadow[name], expected[name])
    # ramp (1 + k) / (10 + k) until it reaches the configured decay
    assert decays == pytest.approx([0.1, 2 / 11, 3 / 12, 4 / 13, 5 / 14, 6 / 15])
    ema.num_updates = 1000
    assert ema.current_decay() == 0.9


def test_ema_differs_from_raw_weights_and_copies():
    m = _module()
    ema = EMA(m, decay=0.99)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 4)
    for _ in range(20):
        loss = m(x).pow(2).mean() + m[0].weight.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.step(m)
    assert not torch.allclose(ema.shadow["0.weight"], m[0].weight)
    averaged = ema.averaged_copy(m)
    torch.testing.assert_close(averaged[0].weight, ema.shadow["0.weight"])
    assert not torch.equal(averaged[0].weight, m[0].weight)          # the original is untouched
    raw = copy.deepcopy(m.state_dict())
    with ema.applied_to(m):
        torch.testing.assert_close(m[0].weight, ema.shadow["0.weight"])
    for k, v in m.state_dict().items():
        assert torch.equal(v, raw[k]), k                               # restored exactly


def test_cpu_storage_and_fp32_shadow():
    m = _module().to(torch.bfloat16)
    ema = EMA(m, decay=0.999, on_cpu=True)
    assert all(s.device.type == "cpu" and s.dtype == torch.float32 for s in ema.shadow.values())
    _perturb(m, 1)
    ema.step(m)
    assert ema.num_updates == 1


def test_state_dict_round_trip_for_resume():
    m = _module()
    ema = EMA(m, decay=0.95)
    for i in range(3):
        _perturb(m, i)
        ema.step(m)
    state = ema.state_dict()
    other = EMA(_module(), decay=0.5)
    other.load_state_dict(state)
    assert other.num_updates == 3 and other.decay == 0.95
    for k in ema.shadow:
        assert torch.equal(other.shadow[k], ema.shadow[k])
    _perturb(m, 9)
    ema.step(m)
    other.step(m)
    for k in ema.shadow:
        assert torch.equal(other.shadow[k], ema.shadow[k])             # continues identically
    state["shadow"]["0.weight"].add_(1)
    assert not torch.equal(state["shadow"]["0.weight"], ema.shadow["0.weight"])   # state is a copy


def test_mismatches_are_clear_errors():
    m = _module()
    ema = EMA(m)
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    bigger[1].requires_grad_(False)
    with pytest.raises(ValueError, match="differ"):
        ema.step(bigger)
    bad = ema.state_dict()
    bad["shadow"]["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="shape"):
        EMA(_module()).load_state_dict(bad)
    with pytest.raises(ValueError, match="no trainable"):
        EMA(torch.nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(m, decay=1.0)
