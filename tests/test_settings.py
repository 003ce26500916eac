"""DreamBoothSettings (validation, serialisation, hashing, step arithmetic) and the settings nodes."""
import dataclasses
import json
import subprocess
import sys

import pytest

from comfyui_dreambooth.training.data.settings import ConceptSettings, DataSettings
from comfyui_dreambooth.training.settings import (
    MAX_SEED, PREVIEW_SCHEDULERS, DreamBoothSettings, SettingsError, recommended_learning_rate, settings_fields)

FIELDS = settings_fields()


def problems_of(**changes):
    return DreamBoothSettings().replace(**changes).validate(check_environment=False)


# ---------------------------------------------------------------------------------------------- defaults

def test_defaults_are_valid_and_follow_the_a1111_guide():
    s = DreamBoothSettings()
    assert s.validate() == []
    assert s.lr_scheduler == "constant_with_warmup"
    r = s.resolved()
    assert r.is_resolved and not s.is_resolved
    assert 100 <= r.steps_per_image <= 175
    assert r.learning_rate == recommended_learning_rate(True) == 1e-4
    assert recommended_learning_rate(False) == pytest.approx(1e-6)
    assert recommended_learning_rate(True, "Prodigy") == 1.0
    assert s.vae_dtype == "fp32"          # fp16 VAEs give NaN / black images
    assert isinstance(s.data, DataSettings) and s.data is not DreamBoothSettings().data


def test_every_field_has_help_and_a_check():
    for name, f in FIELDS.items():
        meta = f.metadata
        assert meta["help"].strip(), name
        if name == "data" or meta["kind"] in (bool, str):
            continue
        assert meta["range"] is not None, f"{name}: numeric settings need a range"


def test_settings_module_does_not_import_torch():
    code = ("import sys; import comfyui_dreambooth.training.settings as s; import comfyui_dreambooth.nodes.settings;"
            "s.DreamBoothSettings().validate(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("name", [n for n, f in FIELDS.items()
                                  if n != "data" and f.metadata["range"] is not None])
def test_out_of_range_values_name_the_setting_and_the_range(name):
    f = FIELDS[name]
    lo, hi = f.metadata["range"]
    bad = f.metadata["kind"](hi) * 2 + 1 if hi < MAX_SEED else -1
    problems = problems_of(**{name: bad})
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{name} = ") and "out of range" in problems[0] and f"{lo:g}" in problems[0]


@pytest.mark.parametrize("name", [n for n, f in FIELDS.items() if f.metadata["choices"]])
def test_bad_choices_list_the_allowed_ones(name):
    problems = problems_of(**{name: "nonsense"})
    assert len(problems) == 1 and problems[0].startswith(f"{name} = 'nonsense'")
    for choice in FIELDS[name].metadata["choices"]:
        assert choice in problems[0]


def test_validate_reports_every_problem_at_once():
    s = DreamBoothSettings(lora_rank=0, batch_size=0, learning_rate=-1.0, lr_scheduler="weird", optimizer="Adam",
                           mixed_precision="fp8", seed=-5, text_encoder_ratio=1.5, use_ema="yes",
                           data=DataSettings(resolution=500, caption_dropout=2.0))
    problems = s.validate()
    named = [p.split(" ")[0] for p in problems]
    assert named == ["lora_rank", "batch_size", "learning_rate", "lr_scheduler", "optimizer", "use_ema",
                     "mixed_precision", "text_encoder_ratio", "seed", "data.resolution", "data.caption_dropout"], \
        problems
    with pytest.raises(SettingsError) as e:
        s.check()
    assert e.value.problems == problems
    for p in problems:
        assert p in str(e.value)
    assert isinstance(e.value, ValueError)


def test_type_errors_are_problems_not_crashes():
    problems = problems_of(lora_rank=4.5, use_lora=1, learning_rate="1e-4", run_name=3, lr_min=float("nan"))
    assert [p.split(" ")[0] for p in problems] == ["use_lora", "lora_rank", "learning_rate", "lr_min", "run_name"]


@pytest.mark.parametrize("changes, fragment", [
    (dict(train_unet=False, text_encoder_ratio=0.0), "nothing would train"),
    (dict(steps_per_image=0, max_train_steps=0), "no length"),
    (dict(lr_scheduler="constant", lr_warmup_steps=10), "constant_with_warmup"),
    (dict(lr_scheduler="linear", lr_warmup_steps=10), "linear_with_warmup"),
    (dict(lr_power=2.0), "polynomial"),
    (dict(lr_cycles=3), "cosine_with_restarts"),
    (dict(lr_min=1e-6), "decaying"),
    (dict(lr_scheduler="cosine", learning_rate=1e-5, lr_min=1e-5), "not below learning_rate"),
    (dict(optimizer="Prodigy", learning_rate=1e-4), "Prodigy"),
    (dict(optimizer="Prodigy", text_encoder_lr=1e-5), "Prodigy"),
    (dict(optimizer="Prodigy", learning_rate=1.0, text_encoder_lr=0.5), "one step size"),
    (dict(pause_after_epochs=5), "pause_seconds"),
    (dict(pause_seconds=30.0), "pause_after_epochs"),
    (dict(run_name="../escape"), "run_name"),
    (dict(run_name=""), "run_name"),
    (dict(run_name="a/b"), "run_name"),
])
def test_cross_field_problems(changes, fragment):
    problems = problems_of(**changes)
    assert len(problems) == 1 and fragment in problems[0], problems


def test_cross_field_combinations_that_are_fine():
    assert problems_of(lr_scheduler="cosine", lr_min=1e-6, learning_rate=1e-4) == []
    assert problems_of(lr_scheduler="polynomial", lr_power=2.0, lr_warmup_steps=5) == []
    assert problems_of(lr_scheduler="cosine_with_restarts", lr_cycles=4) == []
    assert problems_of(optimizer="Prodigy") == []                       # auto lr -> 1.0
    assert problems_of(optimizer="Prodigy", learning_rate=0.5, text_encoder_lr=0.5) == []
    assert problems_of(pause_after_epochs=2, pause_seconds=1.5) == []
    assert problems_of(train_unet=False, text_encoder_ratio=0.5) == []
    assert problems_of(steps_per_image=0, max_train_steps=500) == []


def test_length_dependent_problems_need_the_example_count():
    s = DreamBoothSettings(steps_per_image=2, lr_warmup_steps=50)
    assert s.validate(check_environment=False) == []
    (problem,) = s.validate(num_examples=10, check_environment=False)   # 20 steps < 50 warm-up
    assert "lr_warmup_steps = 50" in problem and "20 steps" in problem
    assert s.validate(num_examples=100, check_environment=False) == []
    assert "0 examples" in s.validate(num_examples=0, check_environment=False)[0]


def test_environment_problems_name_the_package(monkeypatch):
    from comfyui_dreambooth.training import compat

    monkeypatch.setattr(compat, "installed", lambda module: False)
    (problem,) = DreamBoothSettings(optimizer="AdamW8bit").validate()
    assert "pip install bitsandbytes" in problem and "'AdamW'" in problem
    (problem,) = DreamBoothSettings(optimizer="Prodigy").validate()
    assert "pip install prodigyopt" in problem
    assert DreamBoothSettings(optimizer="AdamW8bit").validate(check_environment=False) == []


def test_xformers_is_checked_when_chosen(monkeypatch):
    from comfyui_dreambooth.training import compat

    monkeypatch.setattr(compat, "installed", lambda module: False)
    (problem,) = DreamBoothSettings(attention="xformers").validate()
    assert "xformers is not installed" in problem and "sdpa" in problem


# ---------------------------------------------------------------------------------------------- auto values

def test_resolved_fills_auto_values_from_mode_optimizer_and_concepts():
    person, style = ConceptSettings(concept_type="person"), ConceptSettings(concept_type="style")
    r = DreamBoothSettings(use_lora=False).resolved([style])
    assert r.learning_rate == pytest.approx(1e-6)
    assert (r.steps_per_image, r.text_encoder_ratio) == (100, 0.2)
    r = DreamBoothSettings().resolved([style, person])                 # the larger preset wins
    assert (r.steps_per_image, r.text_encoder_ratio) == (150, 0.7)
    assert DreamBoothSettings(optimizer="Lion").resolved().learning_rate < 1e-4
    explicit = DreamBoothSettings(learning_rate=5e-5, steps_per_image=3, text_encoder_ratio=0.0)
    assert explicit.resolved([person]) == explicit
    assert explicit.text_encoder_learning_rate == 5e-5 and not explicit.trains_text_encoder
    assert explicit.replace(text_encoder_lr=1e-5).text_encoder_learning_rate == 1e-5
    with pytest.raises(ValueError, match="resolved"):
        _ = DreamBoothSettings().unet_lr
    assert DreamBoothSettings(clip_skip=0).clip_skip_or_none is None
    assert DreamBoothSettings(clip_skip=2).clip_skip_or_none == 2


# ---------------------------------------------------------------------------------------------- step arithmetic

@pytest.mark.parametrize("examples, batch, accum, epochs, cap, expected", [
    (10, 1, 1, 100, 0, 1000),
    (10, 2, 1, 100, 0, 500),
    (10, 3, 1, 100, 0, 400),        # ceil(10/3) = 4 steps per epoch
    (10, 2, 2, 100, 0, 300),        # ceil(10/4) = 3
    (9, 2, 4, 10, 0, 20),           # ceil(9/8) = 2
    (10, 1, 1, 100, 250, 250),      # max_train_steps caps
    (10, 1, 1, 100, 5000, 1000),    # ...but never extends
    (10, 1, 1, 0, 777, 777),        # steps_per_image 0: max_train_steps alone
])
def test_total_steps(examples, batch, accum, epochs, cap, expected):
    s = DreamBoothSettings(batch_size=batch, gradient_accumulation_steps=accum, steps_per_image=epochs,
                           max_train_steps=cap)
    assert s.total_steps(examples) == expected


def test_steps_with_bucketed_batches_and_epochs():
    s = DreamBoothSettings(batch_size=4, gradient_accumulation_steps=2, steps_per_image=10)
    assert s.steps_per_epoch(16) == 2
    assert s.steps_per_epoch(16, batches_per_epoch=7) == 4        # buckets leave partial batches
    assert s.total_steps(16, batches_per_epoch=7) == 40
    assert s.num_epochs(16) == 10
    assert s.replace(max_train_steps=5).num_epochs(16) == 3       # last epoch cut short
    assert s.replace(text_encoder_ratio=0.7).text_encoder_train_steps(1000) == 700
    assert s.replace(text_encoder_ratio=0.35).text_encoder_train_steps(20) == 7
    assert s.replace(text_encoder_ratio=0.0).text_encoder_train_steps(1000) == 0
    with pytest.raises(ValueError, match="resolved"):
        DreamBoothSettings().total_steps(10)


# ---------------------------------------------------------------------------------------------- serialisation

def test_dict_and_json_round_trip():
    s = DreamBoothSettings(use_lora=False, lora_type="lokr", learning_rate=3e-6, lr_scheduler="cosine",
                           lr_min=1e-7, seed=MAX_SEED, run_name="my dog", prior_loss_weight=0.5,
                           data=DataSettings(resolution=768, random_flip=True))
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["data"]["resolution"] == 768
    assert DreamBoothSettings.from_dict(d) == s
    assert DreamBoothSettings.from_json(s.to_json()) == s
    assert DreamBoothSettings.from_dict({}) == DreamBoothSettings()            # missing keys -> defaults
    assert DreamBoothSettings.from_dict({"seed": 7, "data": {"resolution": 640}}) == \
        DreamBoothSettings(seed=7, data=DataSettings(resolution=640))


def test_from_dict_names_every_unknown_key_and_bad_value():
    with pytest.raises(SettingsError) as e:
        DreamBoothSettings.from_dict({"lr": 1e-4, "stepz": 3, "lora_rank": "big", "use_lora": "yes",
                                      "optimizer": 5, "use_ema": None, "data": {"resolutoin": 512}})
    text = str(e.value)
    assert len(e.value.problems) == 6
    for fragment in ("lr, stepz", "lora_rank = 'big'", "use_lora = 'yes'", "optimizer = 5", "use_ema = null",
                     "resolutoin"):
        assert fragment in text
    with pytest.raises(SettingsError, match="JSON object"):
        DreamBoothSettings.from_dict([1, 2])
    with pytest.raises(SettingsError, match="not valid JSON"):
        DreamBoothSettings.from_json("{")


def test_json_numbers_take_the_field_type():
    s = DreamBoothSettings.from_dict({"lora_rank": 8.0, "pause_seconds": 5, "learning_rate": 1, "data": {}})
    assert s.lora_rank == 8 and type(s.lora_rank) is int
    assert type(s.pause_seconds) is float and type(s.learning_rate) is float
    assert DreamBoothSettings(pause_seconds=5).to_dict()["pause_seconds"] == 5.0


# ---------------------------------------------------------------------------------------------- config hash

def _changed_value(name):
    f = FIELDS[name]
    meta = f.metadata
    current = getattr(DreamBoothSettings(), name)
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != current)
    if meta["kind"] is bool:
        return not current
    if meta["kind"] is str:
        return current + "x"
    lo, hi = meta["range"]
    return meta["kind"](hi) if current != hi else meta["kind"](lo)


def test_config_hash_is_stable_and_ignores_key_order():
    s = DreamBoothSettings(seed=3)
    h = s.config_hash()
    assert len(h) == 16 and h == DreamBoothSettings(seed=3).config_hash()
    shuffled = dict(reversed(list(s.to_dict().items())))
    assert DreamBoothSettings.from_dict(shuffled).config_hash() == h
    assert DreamBoothSettings(pause_seconds=5).config_hash() == DreamBoothSettings(pause_seconds=5.0).config_hash()
    code = ("from comfyui_dreambooth.training.settings import DreamBoothSettings as S;"
            "print(S(seed=3).config_hash())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == h                                    # same in a fresh process


@pytest.mark.parametrize("name", [n for n, f in FIELDS.items()
                                  if n != "data" and len(f.metadata["choices"] or "ab") > 1])
def test_config_hash_covers_exactly_the_result_settings(name):
    base = DreamBoothSettings()
    changed = base.replace(**{name: _changed_value(name)})
    differs = changed.config_hash() != base.config_hash()
    assert differs == FIELDS[name].metadata["affects_result"], name


def test_config_hash_cosmetic_choices():
    cosmetic = {n for n, f in FIELDS.items() if n != "data" and not f.metadata["affects_result"]}
    assert cosmetic == {"pause_after_epochs", "pause_seconds", "save_every_epochs", "preview_every_epochs",
                        "set_grads_to_none", "gradient_checkpointing", "ema_on_cpu", "keep_last_checkpoints",
                        "run_name", "preview_scheduler", "preview_steps", "preview_cfg",
                        "auto_fit",     # what auto_fit changes is recorded as the settings it changed
                        # validation measures and chooses, never changes a step (a held-out image leaves the
                        # training data: the run id covers the data)
                        "validate_every_steps", "validation_images", "validation_prompt", "validation_samples",
                        "keep_best", "best_drift_ceiling", "early_stop", "tensorboard"}
    base = DreamBoothSettings()
    assert base.replace(data=DataSettings(cache_mode="memory")).config_hash() == base.config_hash()
    assert base.replace(data=DataSettings(resolution=768)).config_hash() != base.config_hash()


def test_choice_lists_match_the_modules_that_use_them():
    from comfyui_dreambooth.training import sampling
    from comfyui_dreambooth.training.settings import LORA_TEXT_ENCODER_TARGETS, LORA_TYPES, LORA_UNET_TARGETS
    from comfyui_dreambooth.training.setup import adapters

    assert set(PREVIEW_SCHEDULERS) == set(sampling.SCHEDULERS)
    assert set(LORA_UNET_TARGETS) == set(adapters.UNET_TARGET_PRESETS)
    assert set(LORA_TEXT_ENCODER_TARGETS) == set(adapters.TEXT_ENCODER_TARGET_PRESETS)
    assert set(LORA_TYPES) == set(adapters.LORA_TYPES)
    assert DreamBoothSettings().lora_unet_targets == adapters.DEFAULT_UNET_TARGETS
    assert DreamBoothSettings().lora_text_encoder_targets == adapters.DEFAULT_TEXT_ENCODER_TARGETS


# ---------------------------------------------------------------------------------------------- nodes

from comfyui_dreambooth.nodes import settings as nodes  # noqa: E402

NODE_CLASSES = list(nodes.NODE_CLASS_MAPPINGS.values())


def widget_defaults(cls):
    return {name: spec[1]["default"] for name, spec in cls.INPUT_TYPES()["required"].items()}


def test_node_contract():
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    for cls in NODE_CLASSES:
        assert cls.RETURN_TYPES == ("DB_CONFIG", "STRING") and cls.CATEGORY == "DreamBooth/settings"
        assert cls.RETURN_NAMES == ("config", "memory_estimate") and len(cls.OUTPUT_TOOLTIPS) == 2
        assert callable(getattr(cls(), cls.FUNCTION))
        inputs = cls.INPUT_TYPES()
        assert inputs["optional"]["config"][0] == "DB_CONFIG" and inputs["optional"]["model"][0] == "DB_MODEL"
        for section in ("required", "optional"):
            for name, spec in inputs[section].items():
                assert spec[1].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
                if spec[0] in ("INT", "FLOAT"):
                    opts = spec[1]
                    assert opts["min"] <= opts["default"] <= opts["max"] and opts["step"] > 0, name
                if isinstance(spec[0], list):
                    assert spec[1]["default"] in spec[0], name


def test_every_setting_has_exactly_one_widget():
    owned = [n for cls in NODE_CLASSES if cls is not nodes.DreamBoothDataNode for n in cls.FIELDS]
    assert sorted(owned) == sorted(n for n in FIELDS if n != "data")
    assert set(nodes.DreamBoothDataNode.FIELDS) == {f.name for f in dataclasses.fields(DataSettings)}


def test_widget_defaults_build_the_default_settings():
    for cls in NODE_CLASSES:
        (config,) = cls().build(**widget_defaults(cls))
        assert config == DreamBoothSettings(), cls.__name__


def test_auto_widgets():
    (config,) = nodes.DreamBoothSettingsNode().build(**{**widget_defaults(nodes.DreamBoothSettingsNode),
                                                        "learning_rate": 0.0, "steps_per_image": -1,
                                                        "text_encoder_ratio": -1.0, "text_encoder_lr": 0.0})
    assert None is config.learning_rate is config.steps_per_image is config.text_encoder_ratio
    assert config.text_encoder_lr is None
    (config,) = nodes.DreamBoothSettingsNode().build(**{**widget_defaults(nodes.DreamBoothSettingsNode),
                                                        "learning_rate": 5e-5, "steps_per_image": 0,
                                                        "max_train_steps": 300, "text_encoder_ratio": 0})
    assert (config.learning_rate, config.steps_per_image, config.text_encoder_ratio) == (5e-5, 0, 0.0)
    assert type(config.text_encoder_ratio) is float


def test_chained_nodes_build_the_expected_settings_without_touching_their_input():
    base_widgets = {**widget_defaults(nodes.DreamBoothSettingsNode), "use_lora": False, "learning_rate": 2e-6,
                    "lr_scheduler": "cosine", "lr_min": 1e-7, "optimizer": "SGD", "seed": 42, "run_name": "dog"}
    (a,) = nodes.DreamBoothSettingsNode().build(**base_widgets)
    a_before = a.to_dict()
    (b,) = nodes.DreamBoothOptimizerNode().build(config=a, **{**widget_defaults(nodes.DreamBoothOptimizerNode),
                                                              "use_ema": True, "sgd_momentum": 0.5})
    (c,) = nodes.DreamBoothAdvancedNode().build(config=b, **{**widget_defaults(nodes.DreamBoothAdvancedNode),
                                                             "offset_noise": 0.1, "prior_mode": "base_model",
                                                             "prior_loss_weight": 0.3})
    (d,) = nodes.DreamBoothDataNode().build(config=c, **{**widget_defaults(nodes.DreamBoothDataNode),
                                                         "resolution": 768, "random_flip": True})
    expected = DreamBoothSettings(use_lora=False, learning_rate=2e-6, lr_scheduler="cosine", lr_min=1e-7,
                                  optimizer="SGD", seed=42, run_name="dog", use_ema=True, sgd_momentum=0.5,
                                  offset_noise=0.1, prior_mode="base_model", prior_loss_weight=0.3,
                                  data=DataSettings(resolution=768, random_flip=True))
    assert d == expected
    assert a.to_dict() == a_before and b.data == DataSettings() and a is not b
    # a settings node downstream overrides only its own widgets
    (e,) = nodes.DreamBoothOptimizerNode().build(config=d, **widget_defaults(nodes.DreamBoothOptimizerNode))
    assert e == expected.replace(use_ema=False, sgd_momentum=0.9)


def test_invalid_widgets_list_every_problem():
    widgets = {**widget_defaults(nodes.DreamBoothSettingsNode), "lr_scheduler": "constant", "lr_warmup_steps": 10,
               "train_unet": False, "text_encoder_ratio": 0.0, "optimizer": "Prodigy", "learning_rate": 1e-4,
               "run_name": "../x"}
    with pytest.raises(SettingsError) as e:
        nodes.DreamBoothSettingsNode().build(**widgets)
    from comfyui_dreambooth.training.setup.optimizers import missing_optimizer_package

    # 4 bad values, plus the missing optional package where prodigyopt is not installed (a fresh CI venv)
    assert len(e.value.problems) == 4 + (1 if missing_optimizer_package("Prodigy") else 0)
    assert "DreamBoothSettingsNode" in str(e.value)
    with pytest.raises(SettingsError) as e:
        nodes.DreamBoothDataNode().build(**{**widget_defaults(nodes.DreamBoothDataNode), "bucket_min_side": 1024,
                                           "background_color": "nocolour"})
    assert len(e.value.problems) == 2
    with pytest.raises(TypeError, match="DB_CONFIG"):
        nodes.DreamBoothAdvancedNode().build(config={"seed": 1}, **widget_defaults(nodes.DreamBoothAdvancedNode))


def test_seed_widget_has_no_randomize_control():
    """The frontend would otherwise randomize the training seed every queue (no run reuse, no resume)."""
    from comfyui_dreambooth.nodes.settings import DreamBoothAdvancedNode, DreamBoothOptimizerNode, DreamBoothSettingsNode

    found = False
    for node in (DreamBoothSettingsNode, DreamBoothOptimizerNode, DreamBoothAdvancedNode):
        spec = node.INPUT_TYPES()
        for section in spec.values():
            if "seed" in section:
                found = True
                assert section["seed"][1]["control_after_generate"] is False
    assert found


def test_defaults_follow_the_a1111_guide():
    """Issue 6: LR ~1e-6 full fine-tune / 1e-4 LoRA, constant_with_warmup, 100-175 steps per image."""
    from comfyui_dreambooth.training.data.settings import CONCEPT_TYPES, concept_type_defaults

    assert DreamBoothSettings().lr_scheduler == "constant_with_warmup"
    assert recommended_learning_rate(True) == pytest.approx(1e-4)
    assert recommended_learning_rate(False) == pytest.approx(1e-6)
    for kind in CONCEPT_TYPES:
        assert 100 <= concept_type_defaults(kind)["steps_per_image"] <= 175, kind


def test_data_node_bucket_sides_follow_the_resolution():
    """Issue 9: the Data node with its default widgets refused resolution 128 (bucket_min_side 256)."""
    widgets = widget_defaults(nodes.DreamBoothDataNode)
    assert widgets["bucket_min_side"] == 0 and widgets["bucket_max_side"] == 0     # auto
    (config,) = nodes.DreamBoothDataNode().build(**{**widgets, "resolution": 128})
    assert config.data == DataSettings(resolution=128)
    assert (config.data.effective_bucket_min_side, config.data.effective_bucket_max_side) == (128, 1024)
    (config,) = nodes.DreamBoothDataNode().build(**{**widgets, "resolution": 2048})
    assert config.data.effective_bucket_max_side == 2048
    (config,) = nodes.DreamBoothDataNode().build(**{**widgets, "resolution": 128, "bucket_min_side": 64})
    assert config.data.bucket_min_side == 64
    with pytest.raises(SettingsError, match="bucket_min_side = 256"):
        nodes.DreamBoothDataNode().build(**{**widgets, "resolution": 128, "bucket_min_side": 256})


def test_auto_data_values_hash_as_their_resolved_values():
    """Auto and the value it stands for train the same weights, so they name the same run (and the default
    settings keep the hash they had when 256 / 1024 were written out)."""
    auto = DreamBoothSettings(data=DataSettings(resolution=128))
    explicit = DreamBoothSettings(data=DataSettings(resolution=128, bucket_min_side=128, bucket_max_side=1024))
    assert auto.config_hash() == explicit.config_hash()
    assert auto.result_dict()["data"]["bucket_min_side"] == 128
    assert DreamBoothSettings().config_hash() == DreamBoothSettings(
        data=DataSettings(bucket_min_side=256, bucket_max_side=1024)).config_hash()
    assert auto.config_hash() != explicit.replace(data=explicit.data.replace(bucket_min_side=64)).config_hash()
    assert DreamBoothSettings.from_dict(json.loads(auto.to_json())) == auto
