"""The toy world on the canvas (issue 19 point 6): the shipped toy base in LoadBaseModel's list, a concept folder
"toyworld:NAME" that draws its subject, and the toy example workflow wired to both."""
import json
import os

import pytest

import make_example_workflows as make
from comfyui_dreambooth.nodes import comfy_compat as compat
from comfyui_dreambooth.nodes.concepts import make_concept, resolve_folder
from comfyui_dreambooth.nodes.models import TOY_BASE, LoadBaseModel, model_choices, resolve_model_path
from comfyui_dreambooth.training.toyworld.commands import SUBJECT_IMAGES, base_path

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows",
                       f"{make.TOY_WORLD_SUBJECT}.json")


@pytest.fixture
def folders(tmp_path):
    compat.set_input_directory(str(tmp_path / "input"))
    compat.set_output_directory(str(tmp_path / "output"))
    yield tmp_path
    compat.set_input_directory(None)
    compat.set_output_directory(None)


def test_the_toy_base_is_always_a_choice_and_loads(folders):
    assert TOY_BASE in model_choices()
    assert resolve_model_path(TOY_BASE) == base_path()
    model, info = LoadBaseModel().load(TOY_BASE)
    assert model.family == "sd1" and "toy_base.safetensors" in info


def test_a_toyworld_concept_folder_draws_its_subject_once(folders):
    concept = make_concept(instance_dir="toyworld:split_circle", instance_prompt="a sks toy", instance_token="sks",
                           class_token="toy", class_prompt="a toy", num_class_images_per_image=0)
    folder = folders / "input" / "toyworld" / "split_circle"
    assert concept.instance_dir == str(folder) == resolve_folder("toyworld:split_circle")
    names = sorted(os.listdir(folder))
    assert len(names) == SUBJECT_IMAGES and all(n.endswith(".png") for n in names)
    os.remove(folder / names[0])                      # the user's own pictures (here: fewer) are kept, not redrawn
    make_concept(instance_dir="toyworld:split_circle", instance_prompt="a sks toy", instance_token="sks",
                 class_token="toy", class_prompt="a toy", num_class_images_per_image=0)
    assert len(os.listdir(folder)) == SUBJECT_IMAGES - 1


def test_an_unknown_toyworld_subject_names_the_choices(folders):
    with pytest.raises(ValueError, match="toyworld:split_circle"):
        make_concept(instance_dir="toyworld:teddy", instance_prompt="a sks toy", instance_token="sks",
                     class_token="toy", class_prompt="a toy", num_class_images_per_image=0)


def test_the_toy_example_uses_the_toy_base_and_a_drawn_subject():
    nodes = {n["type"]: n for n in json.load(open(EXAMPLE, encoding="utf-8"))["nodes"]}
    assert nodes["LoadBaseModel"]["widgets_values"][0] == TOY_BASE
    assert nodes["ConceptDataset"]["widgets_values"][0] == "toyworld:split_circle"
    assert {"TrainDreamBooth", "SampleTrained", "SaveCheckpoint", "DreamBoothSettings"} <= set(nodes)
