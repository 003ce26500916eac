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


def test_bucket_sides_follow_the_resolution_unless_set():
    """Issue 9: the default bucket_min_side (256) refused resolution 128; auto sides adapt, explicit ones are
    checked as before."""
    from comfyui_dreambooth.training.data.buckets import make_buckets, target_size

    assert DataSettings().bucket_min_side is None and DataSettings().bucket_max_side is None   # auto
    assert DataSettings(resolution=512).resolved() == DataSettings(resolution=512, bucket_min_side=256,
                                                                   bucket_max_side=1024)    # the old defaults
    for resolution, (lo, hi) in {64: (64, 1024), 128: (128, 1024), 256: (256, 1024), 768: (256, 1024),
                                 1024: (256, 1024), 1536: (256, 1536), 2048: (256, 2048)}.items():
        d = DataSettings(resolution=resolution)
        assert d.validate() == [], resolution
        r = d.resolved()
        assert (r.bucket_min_side, r.bucket_max_side) == (lo, hi), resolution
        assert r.validate() == [] and r.resolved() == r
        assert (d.effective_bucket_min_side, d.effective_bucket_max_side) == (lo, hi)
        for size in ((100, 300), (640, 480), (4000, 1000)):
            assert target_size(*size, d) == target_size(*size, r)
        assert make_buckets(resolution, lo, hi)
    # set explicitly: the user's value is kept and a conflict is still reported, with the way out
    problems = DataSettings(resolution=128, bucket_min_side=256).validate()
    assert len(problems) == 1 and "bucket_min_side = 256" in problems[0] and "auto" in problems[0]
    problems = DataSettings(resolution=2048, bucket_max_side=1024).validate()
    assert len(problems) == 1 and "bucket_max_side = 1024" in problems[0]
    assert DataSettings(resolution=128, bucket_min_side=64).resolved().bucket_min_side == 64
    assert DataSettings(resolution=128, bucketing=False, bucket_min_side=256).validate() == []
    assert "bucket_min_side = 100" in "\n".join(DataSettings(bucket_min_side=100).validate())


def test_auto_bucket_sides_round_trip_through_json():
    d = DataSettings(resolution=128)
    data = json.loads(json.dumps(d.to_dict()))
    assert data["bucket_min_side"] is None and data["bucket_max_side"] is None
    assert DataSettings.from_dict(data) == d
    assert DataSettings.from_dict({"bucket_min_side": 128.0, "bucket_max_side": "2048"}) == DataSettings(
        bucket_min_side=128, bucket_max_side=2048)
    assert type(DataSettings.from_dict({"bucket_min_side": 128.0}).bucket_min_side) is int
    with pytest.raises(ValueError, match="bucket_min_side"):
        DataSettings.from_dict({"bucket_min_side": "small"})
