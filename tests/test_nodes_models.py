"""LoadBaseModel / SampleTrained nodes, headless (no ComfyUI): lists, loading, saving images safely."""
import os
import shutil

import pytest
import torch

import comfyui_dreambooth
from comfyui_dreambooth.nodes import comfy_compat as compat
from comfyui_dreambooth.nodes.models import PATH_BELOW, TOY_BASE, LoadBaseModel, SampleTrained


@pytest.fixture
def output_dir(tmp_path, tiny_files):
    compat.set_output_directory(str(tmp_path))
    os.makedirs(tmp_path / "checkpoints")
    shutil.copy(tiny_files["sd1"]["safetensors"], tmp_path / "checkpoints" / "tiny.safetensors")
    shutil.copytree(tiny_files["sdxl"]["diffusers"], tmp_path / "diffusers" / "tiny_xl")
    yield tmp_path
    compat.set_output_directory(None)


def test_pack_mapping_lists_the_nodes():
    m = comfyui_dreambooth.NODE_CLASS_MAPPINGS
    for name in ("LoadBaseModel", "SampleTrained", "ConceptDataset", "DreamBoothSettings", "SaveLoRA"):
        assert name in m and name in comfyui_dreambooth.NODE_DISPLAY_NAME_MAPPINGS
    for cls in m.values():
        spec = cls.INPUT_TYPES()
        for section_name, section in spec.items():
            if section_name == "hidden":          # ComfyUI-supplied values (unique_id, prompt): not widgets
                continue
            for name, (kind, *opts) in section.items():
                assert opts and opts[0].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
        assert cls.CATEGORY.startswith("DreamBooth")


def test_load_base_model_lists_and_loads(output_dir):
    choices = LoadBaseModel.INPUT_TYPES()["required"]["model"][0]
    assert choices == ["tiny.safetensors", "diffusers/tiny_xl", TOY_BASE, PATH_BELOW]
    model, info = LoadBaseModel().load("tiny.safetensors")
    assert model.family == "sd1" and "sd1" in info
    xl, _ = LoadBaseModel().load("diffusers/tiny_xl")
    assert xl.family == "sdxl"
    by_path, _ = LoadBaseModel().load(PATH_BELOW, model_path=str(output_dir / "checkpoints" / "tiny.safetensors"))
    assert by_path.family == "sd1"
    assert LoadBaseModel.IS_CHANGED("tiny.safetensors") == model.source_hash
    with pytest.raises(ValueError, match="model_path is empty"):
        LoadBaseModel().load(PATH_BELOW)
    with pytest.raises(FileNotFoundError, match="nope"):
        LoadBaseModel().load(PATH_BELOW, model_path="/nope/x.safetensors")


def test_sample_trained_returns_image_and_saves_inside_output(output_dir, tiny_models):
    node = SampleTrained()
    out = node.sample(tiny_models["sd1"], "a photo of sks dog", "", 2, 7.0, 5, 64, 64, 2, "euler", 0,
                      "../../escape/sample")
    images = out["result"][0]
    assert images.shape == (2, 64, 64, 3) and images.dtype == torch.float32
    ui = out["ui"]["images"]
    assert len(ui) == 2
    for entry in ui:
        path = os.path.join(str(output_dir), entry["subfolder"], entry["filename"])
        assert os.path.realpath(path).startswith(os.path.realpath(str(output_dir)) + os.sep)
        assert os.path.isfile(path)
    again = node.sample(tiny_models["sd1"], "a photo of sks dog", "", 2, 7.0, 5, 64, 64, 1, "euler", 0,
                        "../../escape/sample")
    assert again["ui"]["images"][0]["filename"] not in {e["filename"] for e in ui}   # counter, no overwrite
    assert torch.allclose(again["result"][0][0], images[0], atol=1e-4)


def test_sample_trained_seed_widget_takes_the_samplers_whole_range(output_dir, tiny_models):
    """The seed widget's range is the sampler's (sampling.MAX_SEED, 2^64 - 1, as ComfyUI's own samplers), and a
    seed beyond 2^63 samples."""
    from comfyui_dreambooth.training.sampling import MAX_SEED

    seed_spec = SampleTrained.INPUT_TYPES()["required"]["seed"][1]
    assert seed_spec["max"] == MAX_SEED == 2**64 - 1
    out = SampleTrained().sample(tiny_models["sd1"], "a photo of sks dog", "", 2, 7.0, 2**63 + 5, 64, 64, 1, "euler",
                                 0, "seed_range")
    assert out["result"][0].shape == (1, 64, 64, 3)
