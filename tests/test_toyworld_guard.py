"""The toy world's guard (issue 19 point 5): training must teach the shipped toy base a subject, and prior
preservation must keep the class. One real run of training/toyworld/guard.py (full fine-tune, full fine-tune with
prior preservation; about a minute and a half on 2 cores), shared by the tests below.

It fails when training learns nothing: `python bench/toyworld_guard.py --sabotage lr0` (every learning rate 1e-10)
and `--sabotage no_prior_loss` (class images in the batches, their loss weight 0) miss these goals (README "Toy
world" gives the numbers). The LoRA row (`--rows lora`) is not held here yet: over two seeds it gives 0.54-0.67,
under the 0.7 goal.
"""
import pytest

from comfyui_dreambooth.training.toyworld import guard


@pytest.fixture(scope="module")
def result():
    return guard.run(samples=12, rows=("full", "full_prior"))


@pytest.mark.slow
def test_the_untrained_base_does_not_draw_the_subject(result):
    assert result["base_fidelity"] <= 0.1, result


@pytest.mark.slow
def test_a_full_fine_tune_learns_the_subject(result):
    assert result["full_fidelity"] >= 0.7 and result["full_fidelity"] >= result["base_fidelity"] + 0.6, result


@pytest.mark.slow
def test_prior_preservation_keeps_the_class(result):
    assert result["full_prior_pres"] <= 0.2, result


def test_the_guard_names_what_it_misses():
    """`missed` is what bench/toyworld_guard.py exits 1 on: each goal, with the number that missed it."""
    ok = {"base_fidelity": 0.0, "full_fidelity": 0.9, "full_prior_fidelity": 0.3, "full_prior_pres": 0.1}
    assert guard.missed(ok) == []
    bad = dict(ok, full_fidelity=0.5, full_prior_pres=0.6)
    problems = guard.missed(bad)
    assert any(p.startswith("full: subject fidelity 0.5") for p in problems)
    assert any(p.startswith("full_prior: PRES 0.6") for p in problems)
    assert guard.missed(dict(ok, base_fidelity=0.4, full_fidelity=0.9)) != []      # not 0.6 above the base


def test_sabotages_break_what_they_say():
    from comfyui_dreambooth.training.toyworld import dreambench as db

    assert guard.sabotaged(db.GUARD_FULL, "lr0").learning_rate == 1e-10
    assert guard.sabotaged(db.GUARD_FULL_PRIOR, "no_prior_loss").prior_loss_weight == 0.0
    assert guard.sabotaged(db.GUARD_FULL, "no_prior_loss") == db.GUARD_FULL      # nothing to drop without a prior


def test_no_te_lora_sabotage_leaves_the_text_encoder_unadapted():
    """The sabotage reproduces the old defect: the text encoder's adapter exists (and would train) but its forward
    is the base encoder's."""
    import torch

    from comfyui_dreambooth.training.models import build_tiny_model
    from comfyui_dreambooth.training.setup import adapters

    base = build_tiny_model("sd1", seed=0)
    ids = torch.randint(0, 1000, (1, 8))

    def te_out(model):
        with torch.no_grad():
            return model.text_encoders[0](ids)[0]

    with guard.text_encoder_lora_not_applied():
        broken = adapters.add_adapters(base, rank=2, on_text_encoder=True)
    working = adapters.add_adapters(base, rank=2, on_text_encoder=True)
    for model in (broken, working):
        with torch.no_grad():
            for p in adapters.adapter_parameters(model, unet=False, text_encoders=True):
                p.add_(0.5)
    assert adapters.adapter_parameters(broken, unet=False, text_encoders=True)
    assert torch.allclose(te_out(broken), te_out(base))
    assert not torch.allclose(te_out(working), te_out(base))
