"""ConceptSettings / DataSettings: every problem reported at once, JSON round trip, concept-type presets."""
import json

import pytest

from comfyui_dreambooth.training.data.settings import (ConceptSettings, DataSettings, concept_type_defaults,
                                                        parse_color)


def test_defaults_are_valid(tmp_path):
    assert DataSettings().validate() == []
    assert ConceptSettings(instance_dir=str(tmp_path)).validate() == []


def test_concept_reports_all_problems_at_once(tmp_path):
    c = ConceptSettings(instance_dir=str(tmp_path / "missing"), instance_token="sks", class_token="sks",
                        num_class_images_per_image=5, class_guidance_scale=99, class_steps=0,
                        concept_type="animal", repeats=0, prior_loss_weight=-1)
    problems = c.validate()
    text = "\n".join(problems)
    for name in ("instance_dir", "class_token", "class_dir", "class_guidance_scale", "class_steps",
                 "concept_type", "repeats", "prior_loss_weight"):
        assert name in text
    assert len(problems) >= 8
    assert ConceptSettings(instance_dir="").validate()[0].startswith("instance_dir is empty")


def test_class_dir_must_differ_from_instance_dir(tmp_path):
    c = ConceptSettings(instance_dir=str(tmp_path), class_dir=str(tmp_path), num_class_images_per_image=1,
                        class_prompt="a dog")
    assert any("same folder" in p for p in c.validate())
    assert c.validate(check_paths=False) == []


def test_data_settings_problems_name_setting_value_and_fix():
    d = DataSettings(resolution=500, bucket_min_side=600, bucket_max_side=100, background_color="nope",
                     on_bad_image="ignore", cache_mode="ssd", long_captions="wrap", keep_tokens=-1,
                     caption_dropout=1.5)
    text = "\n".join(d.validate())
    assert "resolution = 500" in text and "use e.g. 512" in text
    for name in ("bucket_min_side", "bucket_max_side", "background_color", "on_bad_image", "cache_mode",
                 "long_captions", "keep_tokens", "caption_dropout"):
        assert name in text


def test_json_round_trip_and_lenient_loading():
    c = ConceptSettings(instance_dir="/x", repeats=3, class_guidance_scale=5.0, concept_type="style")
    assert ConceptSettings.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    d = DataSettings(resolution=768, random_flip=True, caption_dropout=0.1)
    assert DataSettings.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    # older/newer configs: missing keys take defaults, unknown keys are ignored (or refused when strict)
    assert DataSettings.from_dict({"resolution": 640, "future_knob": 1}).resolution == 640
    with pytest.raises(ValueError, match="future_knob"):
        DataSettings.from_dict({"future_knob": 1}, strict=True)
    assert DataSettings.from_dict({"resolution": 640.0, "bucketing": "false"}).bucketing is False
    with pytest.raises(ValueError, match="resolution"):
        DataSettings.from_dict({"resolution": "big"})


def test_concept_type_presets():
    assert concept_type_defaults("person")["text_encoder_ratio"] == 0.7
    assert concept_type_defaults("style")["text_encoder_ratio"] == 0.2
    assert 0.2 < concept_type_defaults("object")["text_encoder_ratio"] < 0.7
    assert all(concept_type_defaults(t)["steps_per_image"] > 0 for t in ("person", "object", "style"))
    with pytest.raises(ValueError, match="concept_type"):
        concept_type_defaults("animal")


def test_parse_color():
    assert parse_color("#000") == (0, 0, 0)
    assert parse_color(" white ") == (255, 255, 255)
    assert parse_color("10, 20, 30") == (10, 20, 30)
    for bad in ("300,0,0", "blurple", "1,2"):
        with pytest.raises(ValueError):
            parse_color(bad)
