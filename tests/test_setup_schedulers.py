"""LR schedules: each curve matches its formula (warm-up, floor, power, cycles), the torch scheduler follows it,
diffusers' schedules agree when there is no floor, and a resumed scheduler continues the same curve."""
import math

import pytest
import torch

from comfyui_dreambooth.training.settings import LR_SCHEDULERS, DreamBoothSettings
from comfyui_dreambooth.training.setup.schedulers import build_lr_scheduler, lr_at, lr_multiplier

LR = 1e-4
TOTAL = 60


def expected_lr(name, step, *, warmup=0, lr_min=0.0, power=1.0, cycles=1, base=LR, unet_lr=LR):
    """The formulas, written out independently of the implementation."""
    has_warmup = name not in ("constant", "linear")
    w = warmup if has_warmup else 0
    if step < w:
        return base * step / w
    if name.startswith("constant"):
        return base
    p = min(1.0, (step - w) / (TOTAL - w))
    floor = base * lr_min / unet_lr
    if name.startswith("linear"):
        shape = 1 - p
    elif name == "cosine":
        shape = (1 + math.cos(math.pi * p)) / 2
    elif name == "cosine_with_restarts":
        shape = 0.0 if p >= 1 else (1 + math.cos(math.pi * ((cycles * p) % 1))) / 2
    else:
        shape = (1 - p) ** power
    return floor + (base - floor) * shape


def settings(name, **kw):
    return DreamBoothSettings(learning_rate=LR, lr_scheduler=name, **kw)


CASES = [
    ("constant", {}),
    ("constant_with_warmup", {"lr_warmup_steps": 10}),
    ("linear", {}),
    ("linear", {"lr_min": 1e-5}),
    ("linear_with_warmup", {"lr_warmup_steps": 10, "lr_min": 2e-5}),
    ("cosine", {}),
    ("cosine", {"lr_warmup_steps": 5, "lr_min": 1e-6}),
    ("cosine_with_restarts", {"lr_cycles": 3}),
    ("cosine_with_restarts", {"lr_cycles": 2, "lr_warmup_steps": 8, "lr_min": 1e-5}),
    ("polynomial", {"lr_power": 2.0}),
    ("polynomial", {"lr_power": 0.5, "lr_warmup_steps": 6, "lr_min": 1e-5}),
]


@pytest.mark.parametrize("name, kw", CASES)
def test_curve_matches_formula_and_the_torch_scheduler_follows_it(name, kw):
    s = settings(name, **kw)
    assert s.validate(num_examples=TOTAL, check_environment=False) == []
    formula = dict(warmup=kw.get("lr_warmup_steps", 0), lr_min=kw.get("lr_min", 0.0),
                   power=kw.get("lr_power", 1.0), cycles=kw.get("lr_cycles", 1))
    te_lr = 3e-5
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": LR}, {"params": [params[1]], "lr": te_lr}], lr=LR)
    sched = build_lr_scheduler(opt, s, TOTAL)
    for step in range(TOTAL + 5):
        want = expected_lr(name, step, **formula)
        assert lr_at(step, s, TOTAL) == pytest.approx(want, rel=1e-9, abs=1e-15), step
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15), step
        # the text encoder's rate follows the same shape, its floor keeping the same ratio
        want_te = expected_lr(name, step, base=te_lr, **formula)
        assert opt.param_groups[1]["lr"] == pytest.approx(want_te, rel=1e-9, abs=1e-15), step
        opt.step()
        sched.step()


def test_shapes():
    """Sanity of the formulas themselves: warm-up starts at 0, decays end at the floor, restarts restart."""
    s = settings("cosine_with_restarts", lr_cycles=2, lr_min=1e-5)
    assert lr_at(0, s, 100) == pytest.approx(LR)
    assert lr_at(49, s, 100) < 2e-5 and lr_at(50, s, 100) == pytest.approx(LR)      # restart half way
    assert lr_at(100, s, 100) == pytest.approx(1e-5) == lr_at(500, s, 100)
    w = settings("constant_with_warmup", lr_warmup_steps=4)
    assert [lr_multiplier(i, w, 100) for i in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    quad = settings("polynomial", lr_power=2.0)
    assert lr_multiplier(50, quad, 100) == pytest.approx(0.25)
    assert lr_multiplier(50, settings("linear"), 100) == pytest.approx(0.5)
    assert lr_multiplier(50, settings("cosine"), 100) == pytest.approx(0.5)
    assert lr_at(10, settings("constant"), 100, base_lr=7.0) == 7.0


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_matches_diffusers_without_a_floor(name):
    from diffusers.optimization import get_scheduler

    warmup = 0 if name in ("constant", "linear") else 7
    s = settings(name, lr_warmup_steps=warmup, lr_cycles=3 if name == "cosine_with_restarts" else 1,
                 lr_power=1.7 if name == "polynomial" else 1.0)
    diffusers_name = {"linear_with_warmup": "linear"}.get(name, name)
    kwargs = {"num_cycles": 3} if name == "cosine_with_restarts" else {}
    if name == "polynomial":
        kwargs = {"power": 1.7}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    ref = get_scheduler(diffusers_name, opt, num_warmup_steps=warmup, num_training_steps=TOTAL, **kwargs)
    for step in range(TOTAL):
        # diffusers' polynomial ends at lr_end = 1e-7 instead of 0
        tol = 1.1e-7 if name == "polynomial" else 1e-15
        assert lr_at(step, s, TOTAL) == pytest.approx(opt.param_groups[0]["lr"], abs=tol), (name, step)
        opt.step()
        ref.step()


def test_resumed_scheduler_continues_the_same_curve():
    s = settings("cosine", lr_warmup_steps=5, lr_min=1e-6)

    def make():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        return opt, build_lr_scheduler(opt, s, TOTAL)

    opt, sched = make()
    full = []
    for _ in range(TOTAL):
        full.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    opt, sched = make()
    for _ in range(23):
        opt.step()
        sched.step()
    state, opt_state = sched.state_dict(), opt.state_dict()
    opt2, sched2 = make()                       # a resume restores both (the optimizer state holds the lr)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(state)
    resumed = [opt2.param_groups[0]["lr"]]
    for _ in range(TOTAL - 24):
        opt2.step()
        sched2.step()
        resumed.append(opt2.param_groups[0]["lr"])
    assert resumed == full[23:]


def test_bad_inputs():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    with pytest.raises(ValueError, match="total_steps"):
        build_lr_scheduler(opt, settings("constant"), 0)
    with pytest.raises(ValueError, match="lr_scheduler = 'step'"):
        build_lr_scheduler(opt, settings("step"), 10)
