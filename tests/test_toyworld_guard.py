"""Guard tests: training must teach the toy base a subject (issue 19 point 5).

One subject (a red/blue split circle, which "a {colour} {shape} toy" cannot describe), trained with the pack's own
trainer and sampled with its own sampler, read by the toy world's evaluator. These fail when training learns nothing
(a learning rate of ~0, a text-encoder adapter that is not applied, a prior-preservation loss that is dropped): the
README's toy-world section lists each of those runs and its numbers.
"""
import os

import pytest

from comfyui_dreambooth.training.toyworld import dreambench as db
from comfyui_dreambooth.training.toyworld.world import SUBJECTS

pytestmark = pytest.mark.usefixtures("single_thread")

SUBJECT = SUBJECTS["split_circle"]
SAMPLES = 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from comfyui_dreambooth.training.models import load_model
    from comfyui_dreambooth.training.toyworld.commands import base_path

    root = tmp_path_factory.mktemp("toyworld_guard")
    inst = str(root / "instance")
    images = db.write_instance_images(SUBJECT, inst, 5)
    judge = db.judge_for(SUBJECT, images, count=100)
    base = load_model(base_path(), dtype="fp32")
    return {"base": base, "judge": judge, "instance": inst, "root": str(root),
            "base_fidelity": db.subject_fidelity(base, SUBJECT, judge, SAMPLES)}


def _train(world, variant):
    result = db.train_variant(world["base"], variant, world["instance"], os.path.join(world["root"], variant.name),
                              count=5)
    return result.model


def test_untrained_base_does_not_show_the_subject(world):
    assert world["base_fidelity"] <= 0.3


@pytest.mark.parametrize("variant", [db.GUARD_LORA, db.GUARD_FULL], ids=["lora", "full"])
def test_training_teaches_the_subject(world, variant):
    model = _train(world, variant)
    fidelity = db.subject_fidelity(model, SUBJECT, world["judge"], SAMPLES)
    assert fidelity >= 0.7 and fidelity >= world["base_fidelity"] + 0.6, (fidelity, world["base_fidelity"])


def test_prior_preservation_keeps_the_class(world):
    model = _train(world, db.GUARD_LORA_PRIOR)
    assert db.subject_fidelity(model, SUBJECT, world["judge"], SAMPLES) >= 0.5
    pres = db.pres(model, world["judge"], SAMPLES)
    assert pres <= 0.2, pres
