"""The toy world's guard (issue 19 point 5): training must teach the shipped toy base a subject, and prior
preservation must keep the class. One real run of training/toyworld/guard.py (LoRA, full fine-tune, full fine-tune
with prior preservation), shared by the tests below. Its rows run in parallel processes, one per core, each on one
thread (the same numbers as one after another): 82 s on a quiet 2-core machine, against 136 s one after another
(the prior row trains 600 steps and alone sets the parallel time).

It fails when training learns nothing: `python bench/toyworld_guard.py --sabotage lr0` (every learning rate 1e-10),
`--sabotage no_te_lora` (the text encoder's LoRA trained but not applied) and `--sabotage no_prior_loss` (class images
in the batches, their loss weight 0: PRES 0.92) each miss one of these goals (README "Toy world" gives the
numbers). The LoRA row's fidelity goal (0.7) is met at the guard's seed (0.83) but not over seeds (0.46 / 0.08 /
0.46 at seeds 1-3): a non-strict xfail below.
"""
import pytest

from comfyui_dreambooth.training.toyworld import guard


@pytest.fixture(scope="module")
def result():
    return guard.run(samples=12, rows=("lora", "full", "full_prior"))


@pytest.mark.slow
def test_the_untrained_base_does_not_draw_the_subject(result):
    assert result["base_fidelity"] <= 0.1, result


@pytest.mark.slow
def test_a_full_fine_tune_learns_the_subject(result):
    assert result["full_fidelity"] >= 0.7 and result["full_fidelity"] >= result["base_fidelity"] + 0.6, result


@pytest.mark.slow
def test_prior_preservation_keeps_the_class(result):
    assert result["full_prior_pres"] <= 0.2, result


@pytest.mark.slow
def test_prior_preservation_still_learns_the_subject(result):
    """Else its low PRES would say nothing: a run that learns nothing keeps the class too."""
    assert result["full_prior_fidelity"] >= guard.PRIOR_FIDELITY_GOAL, result


@pytest.mark.slow
def test_the_lora_text_encoder_training_reaches_sampling(result):
    assert result["lora_te_shift"] >= guard.TE_SHIFT_GOAL, result


@pytest.mark.slow
@pytest.mark.xfail(reason="issue 19: LoRA's fidelity is seed-unstable (0.83 at this seed, 0.08-0.46 at seeds 1-3; "
                          "goal 0.7)",
                   strict=False)
def test_a_lora_learns_the_subject(result):
    assert result["lora_fidelity"] >= 0.7 and result["lora_fidelity"] >= result["base_fidelity"] + 0.6, result


def test_the_guard_names_what_it_misses():
    """`missed` is what bench/toyworld_guard.py exits 1 on: each goal, with the number that missed it."""
    ok = {"base_fidelity": 0.0, "full_fidelity": 0.9, "full_prior_fidelity": 0.8, "full_prior_pres": 0.1}
    assert guard.missed(ok) == []
    bad = dict(ok, full_fidelity=0.5, full_prior_pres=0.6)
    problems = guard.missed(bad)
    assert any(p.startswith("full: subject fidelity 0.5") for p in problems)
    assert any(p.startswith("full_prior: PRES 0.6") for p in problems)
    unlearnt = guard.missed(dict(ok, full_prior_fidelity=0.3, full_prior_pres=0.0))     # the class kept trivially
    assert len(unlearnt) == 1 and unlearnt[0].startswith("full_prior: subject fidelity 0.3"), unlearnt
    assert guard.missed(dict(ok, base_fidelity=0.4, full_fidelity=0.9)) != []      # not 0.6 above the base


def test_a_text_encoder_that_never_reaches_sampling_is_missed():
    """The no_te_lora defect leaves fidelity intact (the UNet's adapter learns alone), so the guard checks the text
    encoder's effect on the instance prompt's encoding itself."""
    ok = {"base_fidelity": 0.0, "lora_fidelity": 0.8, "lora_te_shift": 0.01}
    assert guard.missed(ok) == []
    problems = guard.missed(dict(ok, lora_te_shift=0.0))
    assert len(problems) == 1 and problems[0].startswith("lora: the text encoder's training moved"), problems


def base_broken_and_working():
    """A tiny base, and two copies with a text-encoder adapter whose weights moved: one under the no_te_lora
    sabotage (adapter not applied), one working."""
    import torch

    from comfyui_dreambooth.training.models import build_tiny_model
    from comfyui_dreambooth.training.setup import adapters

    base = build_tiny_model("sd1", seed=0)
    with guard.text_encoder_lora_not_applied():
        broken = adapters.add_adapters(base, rank=2, on_text_encoder=True)
    working = adapters.add_adapters(base, rank=2, on_text_encoder=True)
    for model in (broken, working):
        with torch.no_grad():
            for p in adapters.adapter_parameters(model, unet=False, text_encoders=True):
                p.add_(0.5)
    return base, broken, working


def test_text_encoder_shift_is_zero_for_an_unapplied_adapter_and_not_for_an_applied_one():
    base, broken, working = base_broken_and_working()
    assert guard.text_encoder_shift(base, broken, "a sks toy") == 0.0
    assert guard.text_encoder_shift(base, working, "a sks toy") > guard.TE_SHIFT_GOAL


def test_sabotages_break_what_they_say():
    from comfyui_dreambooth.training.toyworld import dreambench as db

    assert guard.sabotaged(db.GUARD_FULL, "lr0").learning_rate == 1e-10
    assert guard.sabotaged(db.GUARD_FULL_PRIOR, "no_prior_loss").prior_loss_weight == 0.0
    assert guard.sabotaged(db.GUARD_FULL, "no_prior_loss") == db.GUARD_FULL      # nothing to drop without a prior


def test_no_te_lora_sabotage_leaves_the_text_encoder_unadapted():
    """The sabotage reproduces the old defect: the text encoder's adapter exists (and would train) but its forward
    is the base encoder's."""
    import torch

    from comfyui_dreambooth.training.setup import adapters

    base, broken, working = base_broken_and_working()
    ids = torch.randint(0, 1000, (1, 8))

    def te_out(model):
        with torch.no_grad():
            return model.text_encoders[0](ids)[0]

    assert adapters.adapter_parameters(broken, unet=False, text_encoders=True)
    assert torch.allclose(te_out(broken), te_out(base))
    assert not torch.allclose(te_out(working), te_out(base))
