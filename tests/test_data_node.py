"""The ConceptDataset node: widgets, tooltips, chaining, folder resolution, the scan report."""
import os

import pytest
from PIL import Image

from comfyui_dreambooth.nodes import comfy_compat
from comfyui_dreambooth.nodes.concepts import ConceptDataset, resolve_folder
from comfyui_dreambooth.training.data.settings import ConceptSettings

WIDGETS = dict(instance_prompt="[filewords]", instance_token="sks", class_dir="", class_prompt="photo of a dog",
               class_token="dog", class_negative_prompt="", num_class_images_per_image=0,
               class_guidance_scale=7.5, class_steps=30, sample_prompt="", concept_type="person", repeats=1,
               prior_loss_weight=1.0)


def images(folder, n, size=(32, 32)):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 30, 0, 0)).save(os.path.join(folder, f"{i:02d}.png"))


def test_inputs_match_the_issue_contract_and_have_tooltips():
    spec = ConceptDataset.INPUT_TYPES()
    names = list(spec["required"])
    assert names == ["instance_dir", "instance_prompt", "instance_token", "class_dir", "class_prompt",
                     "class_token", "class_negative_prompt", "num_class_images_per_image", "class_guidance_scale",
                     "class_steps", "sample_prompt", "concept_type", "repeats", "prior_loss_weight", "mask_dir"]
    assert set(names) == {f for f in ConceptSettings.__dataclass_fields__}
    for name, (kind, *opts) in {**spec["required"], **spec["optional"]}.items():
        assert opts and opts[0].get("tooltip"), name
    assert spec["optional"]["concepts"][0] == "CONCEPTS"
    assert ConceptDataset.RETURN_TYPES == ("CONCEPTS", "STRING")
    assert ConceptDataset.CATEGORY.startswith("DreamBooth/")
    assert "sks dog" in spec["required"]["instance_prompt"][1]["tooltip"]


def test_chaining_appends_without_mutating_upstream(tmp_path):
    images(tmp_path / "a", 3)
    images(tmp_path / "b", 2)
    node = ConceptDataset()
    first = node.build(instance_dir=str(tmp_path / "a"), **WIDGETS)
    chain1 = first["result"][0]
    second = node.build(instance_dir=str(tmp_path / "b"), concepts=chain1, **{**WIDGETS, "repeats": 3})
    chain2, report = second["result"]
    assert len(chain1) == 1 and len(chain2) == 2        # upstream list untouched (ComfyUI caches it)
    assert chain2[0] is chain1[0] and chain2[1].repeats == 3
    assert "Concept 1" in report and "Concept 2" in report and "instance images: 2 x 3 repeats" in report
    assert second["ui"]["text"] == [report]


def test_relative_folders_resolve_against_the_input_directory(tmp_path):
    comfy_compat.set_input_directory(str(tmp_path))
    try:
        images(tmp_path / "mydog", 2)
        assert resolve_folder("mydog") == str(tmp_path / "mydog")
        assert resolve_folder(str(tmp_path / "mydog")) == str(tmp_path / "mydog")
        out = ConceptDataset().build(instance_dir="mydog", **WIDGETS)
        assert out["result"][0][0].instance_dir == str(tmp_path / "mydog")
    finally:
        comfy_compat.set_input_directory(None)


def test_prior_preservation_defaults_the_class_folder_and_reports_missing(tmp_path):
    comfy_compat.set_output_directory(str(tmp_path / "out"))
    try:
        images(tmp_path / "dog", 4)
        out = ConceptDataset().build(instance_dir=str(tmp_path / "dog"), **{**WIDGETS, "num_class_images_per_image": 5})
        concept = out["result"][0][0]
        assert concept.class_dir == str(tmp_path / "out" / "dreambooth" / "class_images" / "photo_of_a_dog")
        assert "0 present of 20 needed, 20 missing" in out["result"][1]
    finally:
        comfy_compat.set_output_directory(None)


def test_report_lists_bad_files_duplicates_and_long_captions(tmp_path):
    images(tmp_path / "d", 2)
    (tmp_path / "d" / "02.png").write_bytes((tmp_path / "d" / "00.png").read_bytes())
    (tmp_path / "d" / "03.jpg").write_text("not a jpeg")
    (tmp_path / "d" / "01.txt").write_text(", ".join(f"tag{i}" for i in range(80)))
    report = ConceptDataset().build(instance_dir=str(tmp_path / "d"), **WIDGETS)["result"][1]
    assert "03.jpg" in report and "BAD" in report
    assert "DUPLICATE" in report and "02.png" in report
    assert "01.png" in report and "token limit" in report


def test_invalid_settings_raise_one_error_listing_everything(tmp_path):
    with pytest.raises(ValueError) as e:
        ConceptDataset().build(instance_dir=str(tmp_path / "nope"), **{**WIDGETS, "class_token": "sks"})
    assert "instance_dir" in str(e.value) and "class_token" in str(e.value)


def test_is_changed_follows_folder_contents(tmp_path):
    images(tmp_path / "d", 1)
    before = ConceptDataset.IS_CHANGED(instance_dir=str(tmp_path / "d"), class_dir="")
    assert before == ConceptDataset.IS_CHANGED(instance_dir=str(tmp_path / "d"), class_dir="")
    images(tmp_path / "d", 2)
    assert before != ConceptDataset.IS_CHANGED(instance_dir=str(tmp_path / "d"), class_dir="")


def problem_folder(folder):
    """A folder with one of each problem the user must hear about: a broken image, an exact duplicate, files that
    are not images (more than the old report's cap of 5) and a caption over the token limit."""
    images(folder, 2)
    (folder / "02.png").write_bytes((folder / "00.png").read_bytes())
    (folder / "03.jpg").write_text("not a jpeg")
    for i in range(7):
        (folder / f"notes{i}.md").write_text("x")
    (folder / "01.txt").write_text(", ".join(f"tag{i}" for i in range(80)))


def test_report_and_console_name_every_problem_file_on_its_own_line(tmp_path, capsys):
    """Issue 9: problems were only in the report (ignored files cut at 5, long captions in one warning) and never
    printed; each now has its own line naming the file, in the node's text and on the console."""
    problem_folder(tmp_path / "d")
    capsys.readouterr()
    report = ConceptDataset().build(instance_dir=str(tmp_path / "d"), **WIDGETS)["result"][1]
    printed = capsys.readouterr().out.splitlines()
    d = str(tmp_path / "d")
    expected = {"BAD": [f"{d}/03.jpg"], "DUPLICATE": [f"{d}/02.png"], "IGNORED": [f"{d}/notes{i}.md" for i in range(7)],
                "LONG CAPTION": [f"{d}/01.png"]}
    for kind, paths in expected.items():
        for path in paths:
            in_report = [line for line in report.splitlines() if kind in line and path in line]
            assert len(in_report) == 1, (kind, path, report)
            on_console = [line for line in printed if line.startswith("[DreamBooth] concept 1: ") and kind in line
                          and path in line]
            assert len(on_console) == 1, (kind, path, printed)
    assert "00.png" in [line for line in printed if "DUPLICATE" in line][0]      # what it duplicates
    assert "tokens" in [line for line in printed if "LONG CAPTION" in line][0]


def test_chained_concept_prints_only_its_own_problems(tmp_path, capsys):
    problem_folder(tmp_path / "a")
    images(tmp_path / "b", 2)
    (tmp_path / "b" / "zz.png").write_text("broken")
    first = ConceptDataset().build(instance_dir=str(tmp_path / "a"), **WIDGETS)["result"][0]
    capsys.readouterr()
    report = ConceptDataset().build(instance_dir=str(tmp_path / "b"), concepts=first, **WIDGETS)["result"][1]
    printed = capsys.readouterr().out
    assert "zz.png" in printed and "concept 2: BAD" in printed
    assert "03.jpg" not in printed                      # concept 1's node printed those already
    assert "03.jpg" in report and "zz.png" in report    # the report covers the chain
