"""build_optimizer: every optimizer steps, learning rates per group, 8-bit state, clear errors."""
import pytest
import torch

from comfyui_dreambooth.training import compat
from comfyui_dreambooth.training.settings import OPTIMIZERS, DreamBoothSettings
from comfyui_dreambooth.training.setup import optimizers
from comfyui_dreambooth.training.setup.optimizers import (
    OptimizerUnavailable, build_optimizer, missing_optimizer_package, training_param_groups)

# each optional optimizer -> the module that provides it here
_PROVIDER = {"AdamW8bit": "bitsandbytes", "Lion8bit": "bitsandbytes", "Lion": "lion_pytorch",
             "Prodigy": "prodigyopt", "Adafactor": "transformers"}


def _settings(name, **kw):
    lr = 1.0 if name == "Prodigy" else 1e-2
    return DreamBoothSettings(optimizer=name, learning_rate=lr, **kw)


def _skip_unless_available(name):
    if name == "Lion" and missing_optimizer_package("Lion") is None:
        return
    if name in _PROVIDER:
        pytest.importorskip(_PROVIDER[name])


def _two_modules():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_both_groups(name):
    _skip_unless_available(name)
    unet, te = _two_modules()
    s = _settings(name, text_encoder_lr=(None if name == "Prodigy" else 5e-3))  # Prodigy: one rate for all
    groups = training_param_groups(unet.parameters(), te.parameters(), s)
    opt = build_optimizer(groups, s)
    assert [g["name"] for g in opt.param_groups] == ["unet", "text_encoder"]
    assert [g["lr"] for g in opt.param_groups] == [s.unet_lr, s.text_encoder_learning_rate]
    before = [p.detach().clone() for p in [*unet.parameters(), *te.parameters()]]
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.mse_loss(te(unet(x)), y)
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = [*unet.parameters(), *te.parameters()]
    assert all(not torch.equal(b, a) for b, a in zip(before, after)), "every parameter moved"
    assert losses[-1] < losses[0], (name, losses)


def test_optimizer_hyperparameters_are_passed():
    unet, te = _two_modules()
    s = DreamBoothSettings(learning_rate=1e-3, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6,
                           weight_decay=0.05)
    opt = build_optimizer(unet.parameters(), s)
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-3, (0.8, 0.99), 1e-6, 0.05)
    sgd = build_optimizer(unet.parameters(), s.replace(optimizer="SGD", sgd_momentum=0.7))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.7


def test_adafactor_uses_the_fixed_learning_rate():
    pytest.importorskip("transformers")
    unet, _ = _two_modules()
    opt = build_optimizer(unet.parameters(), DreamBoothSettings(optimizer="Adafactor", learning_rate=3e-4))
    g = opt.param_groups[0]
    assert g["lr"] == 3e-4 and g["relative_step"] is False and g["scale_parameter"] is False


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit"])
def test_8bit_optimizers_keep_8bit_state(name):
    pytest.importorskip("bitsandbytes")
    big = torch.nn.Linear(64, 128)          # 8192-element weight: bitsandbytes quantises tensors >= 4096 elements
    opt = build_optimizer(big.parameters(), DreamBoothSettings(optimizer=name, learning_rate=1e-3))
    big(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()
    state = opt.state[big.weight]
    assert state["state1"].dtype == torch.uint8
    if name == "AdamW8bit":
        assert state["state2"].dtype == torch.uint8
    assert opt.state[big.bias]["state1"].dtype == torch.float32      # small tensors keep fp32 state


def test_missing_package_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(compat, "installed", lambda module: False)
    unet, _ = _two_modules()
    for name, package, alternative in [("AdamW8bit", "bitsandbytes", "AdamW"), ("Lion8bit", "bitsandbytes", "Lion"),
                                       ("Lion", "lion-pytorch", "AdamW"), ("Prodigy", "prodigyopt", "AdamW")]:
        with pytest.raises(OptimizerUnavailable) as e:
            build_optimizer(unet.parameters(), _settings(name))
        message = str(e.value)
        assert f"pip install {package}" in message and alternative in message and name in message
        assert isinstance(e.value, ImportError)
    # the built-in ones need nothing
    assert missing_optimizer_package("AdamW") is None and missing_optimizer_package("SGD") is None


def test_a_package_that_fails_to_import_is_reported(monkeypatch):
    monkeypatch.setattr(compat, "installed", lambda module: True)

    def broken(module):
        raise RuntimeError("CUDA Setup failed")
    monkeypatch.setattr(optimizers.importlib, "import_module", broken)
    unet, _ = _two_modules()
    with pytest.raises(OptimizerUnavailable, match="CUDA Setup failed.*pip install bitsandbytes"):
        build_optimizer(unet.parameters(), _settings("AdamW8bit"))


def test_no_trainable_parameters():
    unet, te = _two_modules()
    unet.requires_grad_(False)
    te.requires_grad_(False)
    s = DreamBoothSettings(learning_rate=1e-4)
    assert training_param_groups(unet.parameters(), te.parameters(), s) == []
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([], s)
    te.weight.requires_grad_(True)
    (group,) = training_param_groups(unet.parameters(), te.parameters(), s)
    assert group["name"] == "text_encoder" and group["params"] == [te.weight]


def test_lion_prefers_lion_pytorch_and_falls_back_to_bitsandbytes(monkeypatch):
    unet, _ = _two_modules()
    s = DreamBoothSettings(optimizer="Lion", learning_rate=1e-4, weight_decay=0.1)
    if compat.installed("lion_pytorch"):
        assert type(build_optimizer(unet.parameters(), s)).__module__.startswith("lion_pytorch")
    pytest.importorskip("bitsandbytes")
    real = compat.installed
    monkeypatch.setattr(compat, "installed", lambda module: module != "lion_pytorch" and real(module))
    opt = build_optimizer(unet.parameters(), s)
    assert type(opt).__module__.startswith("bitsandbytes") and opt.param_groups[0]["weight_decay"] == 0.1
    unet(torch.randn(2, 8)).sum().backward()
    opt.step()
    assert opt.state[unet.weight]["state1"].dtype == torch.float32          # the 32-bit Lion


def test_adafactor_factors_a_conv_kernel_as_a_matrix():
    """Issue 21: transformers' Adafactor factors the last two dimensions (a kernel's 3x3), keeping out*in*3 row
    values; ours steps a kernel as the matrix (out, in*k*k): out + in*k*k values. A 2-D weight and the kernel's
    update itself are what transformers' Adafactor computes on that matrix."""
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    kernel = torch.nn.Parameter(torch.randn(64, 32, 3, 3))
    matrix = torch.nn.Parameter(kernel.detach().reshape(64, -1).clone())
    settings = DreamBoothSettings(optimizer="Adafactor", learning_rate=1e-3)
    kw = dict(lr=1e-3, weight_decay=settings.weight_decay, scale_parameter=False, relative_step=False,
              warmup_init=False)
    ours = build_optimizer([kernel], settings)
    theirs = Adafactor([matrix], **kw)
    for _ in range(3):
        g = torch.randn(64, 32, 3, 3)
        kernel.grad, matrix.grad = g.clone(), g.reshape(64, -1).clone()
        ours.step()
        theirs.step()
    assert kernel.shape == (64, 32, 3, 3) and kernel.grad.shape == (64, 32, 3, 3)
    assert torch.equal(kernel.detach().reshape(64, -1), matrix.detach())
    state = ours.state[kernel]
    assert state["exp_avg_sq_row"].shape == (64,) and state["exp_avg_sq_col"].shape == (32 * 9,)
