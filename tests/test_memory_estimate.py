"""training/memory.py (issue 12): the estimator's exact parts against real tensors and real optimizer states on
the CPU, monotonicity of every VRAM-raising / -lowering setting, the wizard's picks for 4-24 GB cards and the
CLI's JSON shape."""
import json

import pytest
import torch

import make_example_workflows as make
from trainer_fixtures import tiny_settings

pytestmark = pytest.mark.usefixtures("single_thread")


def _real(model, settings):
    """Trained tensors and optimizer state after one real optimizer step, built by the trainer's own code."""
    from comfyui_dreambooth.training.setup.fused import build_training_optimizer
    from comfyui_dreambooth.training.setup.optimizers import training_param_groups
    from comfyui_dreambooth.training.setup.trainable import build_trainable

    tm, unet_params, te_params = build_trainable(model, settings)
    params = [*unet_params, *te_params]
    opt = build_training_optimizer(training_param_groups(unet_params, te_params, settings), settings)
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p)
        if getattr(opt, "fused", False):     # fused_backward steps inside backward: call its hook as backward would
            opt._hook(p)
    opt.step()
    inner = getattr(opt, "_optimizers", [opt])
    state = sum(t.numel() * t.element_size() for o in inner for st in o.state.values() for t in st.values()
                if torch.is_tensor(t))
    if hasattr(opt, "close"):
        opt.close()
    return tm, params, state


CASES = {
    "lora-adamw": dict(use_lora=True, optimizer="AdamW"),
    "lora-te-adamw": dict(use_lora=True, optimizer="AdamW", text_encoder_ratio=0.5),
    "lora-rank8-attention": dict(use_lora=True, lora_rank=8, lora_unet_targets="attention", optimizer="SGD"),
    "dora": dict(use_lora=True, lora_type="dora", optimizer="AdamW"),
    "loha": dict(use_lora=True, lora_type="loha", optimizer="AdamW"),
    "full-adamw": dict(use_lora=False, optimizer="AdamW"),
    "full-te-adamw": dict(use_lora=False, optimizer="AdamW", text_encoder_ratio=0.5),
    "full-sgd": dict(use_lora=False, optimizer="SGD"),
    "full-sgd-no-momentum": dict(use_lora=False, optimizer="SGD", sgd_momentum=0.0),
    "full-adafactor": dict(use_lora=False, optimizer="Adafactor", text_encoder_ratio=0.5),
    "full-fused-adamw": dict(use_lora=False, optimizer="AdamW", fused_backward=True, max_grad_norm=0.0),
    "full-bf16-adamw": dict(use_lora=False, optimizer="AdamW", weights_dtype="bf16", mixed_precision="bf16"),
    "full-bf16-fused-adafactor": dict(use_lora=False, optimizer="Adafactor", weights_dtype="bf16",
                                      mixed_precision="bf16", fused_backward=True, max_grad_norm=0.0),
    "lora-bf16": dict(use_lora=True, optimizer="AdamW", weights_dtype="bf16", mixed_precision="bf16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exact_parts_match_real_tensors(sd1, case):
    from comfyui_dreambooth.training.memory import estimate

    settings = tiny_settings(**CASES[case])
    tm, params, state = _real(sd1, settings)
    est = estimate(sd1, settings)
    trained_bytes = sum(p.numel() * p.element_size() for p in params)
    assert est.details["trained_params"] == sum(p.numel() for p in params)
    assert est.details["trained_tensors"] == len(params)
    assert est.parts["optimizer"] == state
    largest = max(p.numel() * p.element_size() for p in params)
    # the gradients the optimizer step holds (exact; two at once with fused_backward: issue 21); parts["gradients"]
    # is what exists at the peak moment, at most that
    assert est.details["gradients_held"] == (2 * largest if settings.fused_backward else trained_bytes)
    assert est.parts["gradients"] <= est.details["gradients_held"]
    # weights: trained in their dtype + every frozen UNet / trained-encoder parameter at the frozen dtype
    fb = 4 if settings.mixed_precision == "no" else 2
    trained_ids = {id(p) for p in params}
    frozen = [p for m in [tm.unet, *(tm.text_encoders if settings.text_encoder_ratio else [])]
              for p in m.parameters() if id(p) not in trained_ids]
    assert est.parts["weights"] == trained_bytes + sum(p.numel() for p in frozen) * fb


def test_frozen_parts_and_ema(sd1):
    from comfyui_dreambooth.training.memory import estimate

    te = sum(p.numel() for te in sd1.text_encoders for p in te.parameters())
    vae = sum(p.numel() for p in sd1.vae.parameters())
    s = tiny_settings(data={"cache_text_embeds": False, "cache_latents": False})
    est = estimate(sd1, s)
    assert est.parts["text_encoders"] == te * 4 and est.parts["vae"] == vae * 4
    cached = estimate(sd1, tiny_settings())
    assert cached.parts["text_encoders"] == 0 and cached.parts["vae"] == 0      # moved off once cached
    assert estimate(sd1, tiny_settings(prior_mode="base_model")).parts["text_encoders"] == te * 4
    full = tiny_settings(use_lora=False, use_ema=True)
    unet = sum(p.numel() for p in sd1.unet.parameters())
    assert estimate(sd1, full).parts["ema"] == 4 * unet
    assert estimate(sd1, full.replace(ema_on_cpu=True)).parts["ema"] == 0


def test_fp8_frozen_weights_counted_per_layer(sd1):
    from comfyui_dreambooth.training.memory import estimate

    s = tiny_settings(mixed_precision="bf16")
    lin = [m.weight.numel() for m in sd1.unet.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)]
    auto = estimate(sd1, s).parts["weights"]
    fp8 = estimate(sd1, s.replace(frozen_dtype="fp8")).parts["weights"]
    assert auto - fp8 == sum(lin)          # 2 bytes -> 1 byte for each frozen Linear / Conv2d weight


def test_family_keywords_count_the_real_architectures():
    from comfyui_dreambooth.training.memory import estimate, model_shape
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    counts = {}
    for kw in ("sd15", "sd2", "sdxl"):
        shape = model_shape(kw)
        counts[kw] = sum(p.numel() for p in shape.unet.parameters())
        assert all(p.device.type == "meta" for p in shape.unet.parameters())
    assert 855e6 < counts["sd15"] < 865e6          # SD1.5 UNet: 859.5M
    assert 860e6 < counts["sd2"] < 870e6           # SD2.1 UNet: 865.9M
    assert 2.55e9 < counts["sdxl"] < 2.6e9         # SDXL UNet: 2.567B
    est = estimate("sdxl", DreamBoothSettings(use_lora=False), 1024, 1)
    assert est.parts["optimizer"] > 8 * 2.5e9      # AdamW: two fp32 moments of 2.5B+ parameters


def test_step_scratch_is_booked_where_the_accounting_books_it():
    """AdamW's scratch inside optimizer.step() (a full fine-tune's peak) is optimizer memory, as torch's MemTracker
    tags it (the accounting of SD1.5's full fine-tune: optimizer 6.62 GiB = states + 8 bytes x the largest tensor,
    temporaries 0); fused_backward's, made in the backward, is a temporary."""
    from comfyui_dreambooth.training.memory import estimate
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    full = estimate("sd15", DreamBoothSettings(use_lora=False, gradient_checkpointing=True, text_encoder_ratio=0.0),
                    512, 1)
    largest = 1280 * 2560 * 3 * 3      # SD1.5's largest UNet tensor: an up block's first 3x3 conv (2560 in)
    assert full.parts["optimizer"] == full.details["optimizer_held"] + 8 * largest
    assert full.parts["temporaries"] == 0
    fused = estimate("sd15", DreamBoothSettings(use_lora=False, gradient_checkpointing=True, text_encoder_ratio=0.0,
                                                mixed_precision="bf16", weights_dtype="bf16", optimizer="Adafactor",
                                                fused_backward=True, max_grad_norm=0.0), 512, 1)
    assert fused.parts["optimizer"] == fused.details["optimizer_held"]
    assert fused.parts["temporaries"] >= 20 * largest


# ---- monotonicity: the A1111 guide's "raise VRAM" / "lower VRAM" settings -------------------------------------
def _total(settings, model="sd15", **kw):
    from comfyui_dreambooth.training.memory import estimate

    return estimate(model, settings, **kw).total


def _base(**changes):
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    return DreamBoothSettings(**{"gradient_checkpointing": True, "text_encoder_ratio": 0.0, **changes})


RAISING = {      # name: (lower-memory settings, higher-memory settings)
    # sliced attention keeps every slice's attention matrix for the backward, which sdpa's kernels never build
    # (the accounting: SD2 LoRA at 768 px 3.32 GiB sliced vs 2.26 sdpa; SDXL LoRA low-memory at 1024: activations +
    # temporaries 1.19 GiB sliced vs 0.74 sdpa); it saves memory only against plain attention, not in training
    "sliced attention (vs sdpa)": (dict(), dict(attention="sliced")),
    "batch 1 -> 2": (dict(batch_size=1), dict(batch_size=2)),
    "no gradient checkpointing": (dict(), dict(gradient_checkpointing=False)),
    "full fine-tune vs LoRA": (dict(use_lora=True), dict(use_lora=False)),
    "EMA on the GPU": (dict(use_lora=False), dict(use_lora=False, use_ema=True)),
    "AdamW vs AdamW8bit": (dict(use_lora=False, optimizer="AdamW8bit"), dict(use_lora=False, optimizer="AdamW")),
    "text encoder trains": (dict(), dict(text_encoder_ratio=0.5)),
    "higher LoRA rank": (dict(lora_rank=8), dict(lora_rank=64)),
    "fp32 compute": (dict(), dict(mixed_precision="no")),
    "uncached latents (VAE stays)": (dict(), dict(data={"cache_latents": False})),
    "Prodigy vs AdamW": (dict(use_lora=False), dict(use_lora=False, optimizer="Prodigy")),
}
LOWERING = {     # name: (settings, the same with the saving)
    "fused_backward": (dict(use_lora=False, mixed_precision="bf16", max_grad_norm=0.0),
                       dict(use_lora=False, mixed_precision="bf16", max_grad_norm=0.0, fused_backward=True)),
    "weights_dtype bf16": (dict(use_lora=False, mixed_precision="bf16"),
                           dict(use_lora=False, mixed_precision="bf16", weights_dtype="bf16")),
    "frozen_dtype fp8": (dict(), dict(frozen_dtype="fp8")),
    "Adafactor vs AdamW": (dict(use_lora=False), dict(use_lora=False, optimizer="Adafactor")),
    "ema_on_cpu": (dict(use_lora=False, use_ema=True), dict(use_lora=False, use_ema=True, ema_on_cpu=True)),
    "SGD without momentum": (dict(use_lora=False, optimizer="SGD"),
                             dict(use_lora=False, optimizer="SGD", sgd_momentum=0.0)),
}


def _settings(d):
    from comfyui_dreambooth.training.data.settings import DataSettings

    d = dict(d)
    data = d.pop("data", None)
    s = _base(**d)
    return s.replace(data=DataSettings(**data)) if data else s


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", list(RAISING))
def test_raising_settings_raise_the_estimate(name, model):
    low, high = RAISING[name]
    assert _total(_settings(high), model) > _total(_settings(low), model)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", list(LOWERING))
def test_lowering_settings_lower_the_estimate(name, model):
    plain, saving = LOWERING[name]
    assert _total(_settings(saving), model) < _total(_settings(plain), model)


def test_resolution_raises_the_estimate():
    s = _base()
    assert _total(s, resolution=768) > _total(s, resolution=512) > _total(s, resolution=256)


# ---- the wizard --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
@pytest.mark.parametrize("vram", [4, 6, 8, 12, 16, 24])
def test_wizard_picks_fit(family, vram):
    from comfyui_dreambooth.training.memory import GB, estimate
    from comfyui_dreambooth.training.wizard import choose_settings

    r = choose_settings(family, vram, images=10, concept_type="person")
    assert r.fits, r.explanation
    if family == "sdxl" and vram == 4:          # SDXL LoRA at 1024 px on 4 GB: fits with 0.05 GB to spare (the step
        assert "tight:" in r.explanation        # accounted at 3.16 GiB + the 0.8 GB overhead guess): said so
    assert r.estimate.total <= vram * GB
    assert estimate(family, r.settings).total == r.estimate.total
    assert 10 % r.settings.batch_size == 0
    assert r.settings.validate(num_examples=10) == []


def test_wizard_modes_and_batch_divides_images():
    from comfyui_dreambooth.training.wizard import choose_settings

    assert choose_settings("sd15", 24, images=12, mode="lora").settings.use_lora is True
    assert choose_settings("sd15", 24, images=12, mode="full").settings.use_lora is False
    big = choose_settings("sd15", 80, images=12)
    assert big.settings.use_lora is False and big.settings.batch_size == 4
    assert "fits without any memory saving" in big.explanation
    assert choose_settings("sd15", 80, images=7).settings.batch_size == 1      # 7 images: only 1 divides it
    assert choose_settings("sd15", 80, images=6).settings.batch_size == 3
    # (3 GB: 4 GB fits a full fine-tune since Adafactor factors conv kernels as matrices, issue 21)
    small = choose_settings("sd15", 3, images=10, mode="auto")
    assert small.settings.use_lora is True and "so LoRA" in small.explanation
    assert "gradient_checkpointing on" in small.explanation and "20% slower" in small.explanation


def test_wizard_json_shape():
    from comfyui_dreambooth.nodes.settings import DreamBoothSettingsNode
    from comfyui_dreambooth.training.wizard import choose_settings

    out = choose_settings("sd15", 8, images=10).to_json_dict()
    assert set(out) == {"settings", "estimate_gb", "explanation"}
    assert {"weights", "gradients", "optimizer", "activations", "total"} <= set(out["estimate_gb"])
    assert abs(sum(v for k, v in out["estimate_gb"].items() if k != "total") - out["estimate_gb"]["total"]) < 0.01
    node_widgets = set()
    for cls in ("DreamBoothSettingsNode", "DreamBoothOptimizerNode", "DreamBoothAdvancedNode", "DreamBoothDataNode"):
        node_widgets |= set(getattr(__import__("comfyui_dreambooth.nodes.settings", fromlist=[cls]), cls).FIELDS)
    assert set(out["settings"]) <= node_widgets
    json.dumps(out)
    del DreamBoothSettingsNode


# ---- the CLI -----------------------------------------------------------------------------------------------------
def _cli(capsys, *argv):
    from comfyui_dreambooth import cli

    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_wizard_json_shape(capsys):
    code, out, err = _cli(capsys, "wizard", "sd15", "--vram", "8", "--images", "12", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"settings", "estimate_gb", "explanation"}
    assert {"weights", "gradients", "optimizer", "activations", "total"} <= set(data["estimate_gb"])
    assert data["estimate_gb"]["total"] <= 8 and 12 % data["settings"]["batch_size"] == 0
    code, out, err = _cli(capsys, "wizard", "sdxl", "--vram", "3")     # frozen weights alone + overhead: > 3 GB
    assert code == 1 and "DOES NOT FIT" in out


def test_cli_estimate_set_and_workflow(capsys):
    import os

    code, out, err = _cli(capsys, "estimate", "sd15", "--json")
    assert code == 0, err
    plain = json.loads(out)
    code, out, err = _cli(capsys, "estimate", "sd15", "--set", "batch_size=4", "--set", "resolution=768", "--json")
    assert code == 0, err
    bigger = json.loads(out)
    assert bigger["settings"]["batch_size"] == 4 and bigger["settings"]["resolution"] == 768
    assert bigger["estimate_gb"]["activations"] > plain["estimate_gb"]["activations"]
    code, out, err = _cli(capsys, "estimate", "sd15", "--set", "no_such=1")
    assert code == 1 and "no_such" in err
    wf = os.path.join(os.path.dirname(__file__), "..", "example_workflows",
                      f"{make.FULL_FINETUNE_OBJECT}.json")
    code, out, err = _cli(capsys, "estimate", "sd15", "--workflow", wf, "--json")
    assert code == 0, err
    assert json.loads(out)["settings"]["use_lora"] is False       # taken from the workflow's settings nodes
    code, out, err = _cli(capsys, "estimate", "sd15")
    assert code == 0 and "activations" in out and "total" in out


def test_cli_help_names_the_family_keywords(capsys):
    from comfyui_dreambooth import cli

    for name in ("estimate", "wizard"):
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        assert "sd15, sd2 or sdxl" in capsys.readouterr().out


# ---- the PerformanceWizard node ----------------------------------------------------------------------------------
def test_performance_wizard_node(sd1, tmp_path):
    from comfyui_dreambooth.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from comfyui_dreambooth.training.settings import DreamBoothSettings
    from trainer_fixtures import make_concept

    cls = NODE_CLASS_MAPPINGS["PerformanceWizard"]
    assert NODE_DISPLAY_NAME_MAPPINGS["PerformanceWizard"] == "DreamBooth Performance Wizard"
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (_, options) in spec[section].items():
            assert options.get("tooltip"), name
    out = cls().choose(sd1, vram_gb=4.0, resolution=64, images=6, mode="auto", concept_type="object")
    config, text = out["result"]
    assert out["ui"] == {"text": [text]}                  # issue 23.4: the explanation is shown on the node itself
    assert isinstance(config, DreamBoothSettings) and config.validate(num_examples=6) == []
    assert 6 % config.batch_size == 0 and "total" in text and "GB" in text
    assert "connected settings" not in text                # nothing connected: nothing to compare with
    concept = make_concept(tmp_path, n=4)
    config, text = cls().choose(sd1, vram_gb=4.0, resolution=64, images=999, mode="lora", concept_type="style",
                                concepts=[concept])["result"]
    assert config.use_lora and 4 % config.batch_size == 0
    start = DreamBoothSettings(run_name="mine", seed=7)
    config, _ = cls().choose(sd1, vram_gb=4.0, resolution=64, images=4, mode="lora", concept_type="person",
                             config=start)["result"]
    assert config.run_name == "mine" and config.seed == 7          # only memory-related settings change


def test_performance_wizard_says_which_connected_settings_it_changed(sd1):
    """Issue 23.4: connected LoRA settings with learning rate 1e-3 became a full fine-tune at 1e-6 unannounced."""
    from comfyui_dreambooth.nodes import NODE_CLASS_MAPPINGS
    from comfyui_dreambooth.training.settings import DreamBoothSettings, recommended_learning_rate

    start = DreamBoothSettings(use_lora=True, learning_rate=1e-3, seed=7)
    config, text = NODE_CLASS_MAPPINGS["PerformanceWizard"]().choose(
        sd1, vram_gb=80.0, resolution=64, images=4, mode="full", concept_type="person", config=start)["result"]
    assert not config.use_lora and config.learning_rate is None
    lines = text.splitlines()
    start_at = lines.index("changed in the connected settings:")
    changed = []
    for line in lines[start_at + 1:]:
        if not line.startswith("- "):
            break
        changed.append(line)
    assert "- use_lora: True -> False" in changed
    rate = recommended_learning_rate(False, config.optimizer)
    assert f"- learning_rate: 0.001 -> auto ({rate:g} for a full fine-tune with {config.optimizer})" in changed
    assert not any(line.startswith("- seed:") for line in changed)     # kept settings are not listed
    _, text = NODE_CLASS_MAPPINGS["PerformanceWizard"]().choose(     # its own choice again: nothing to change
        sd1, vram_gb=80.0, resolution=64, images=4, mode="full", concept_type="person", config=config)["result"]
    assert "the connected settings are kept as they are (nothing changed)." in text.splitlines()


def test_performance_wizard_node_vram_zero_on_a_cpu(sd1, monkeypatch):
    """Issue 23.4: vram_gb 0 (the default) was an error on a server without a GPU; it plans for the free system
    memory there, and says so."""
    from comfyui_dreambooth.nodes import NODE_CLASS_MAPPINGS, wizard

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: vram_gb 0 reads its free memory")
    out = NODE_CLASS_MAPPINGS["PerformanceWizard"]().choose(sd1, vram_gb=0.0, resolution=64, images=4, mode="auto",
                                                            concept_type="person")
    config, text = out["result"]
    assert text.startswith("no GPU found (device cpu): planned for the ") and "GB of system memory" in text
    assert config.validate(num_examples=4) == []
    monkeypatch.setattr(wizard, "_free_system_memory_gb", lambda: None)
    _, text = NODE_CLASS_MAPPINGS["PerformanceWizard"]().choose(sd1, vram_gb=0.0, resolution=64, images=4,
                                                                mode="auto", concept_type="person")["result"]
    assert "free system memory is unknown" in text.splitlines()[0]




def test_text_nits(sd1, capsys):
    """Issue 23.7: "a 8 GB card", "a sd1 model", and "0.00 GB" rows for tiny models."""
    from comfyui_dreambooth.nodes import NODE_CLASS_MAPPINGS
    from comfyui_dreambooth.training.memory import estimate
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    _, text = NODE_CLASS_MAPPINGS["PerformanceWizard"]().choose(sd1, vram_gb=8.0, resolution=64, images=4,
                                                                mode="lora", concept_type="person")["result"]
    assert text.startswith("LoRA of an SD1.x model at 64px") and "0.00 GB" not in text
    table = estimate(sd1, DreamBoothSettings(use_lora=True).resolved()).table()
    assert " MB" in table and "0.00 GB" not in table and table.splitlines()[-1].startswith("total")
    code, out, _ = _cli(capsys, "estimate", "sd15", "--vram", "8")
    assert code == 0 and "an 8 GB card" in out
    code, out, _ = _cli(capsys, "estimate", "sd15", "--vram", "12")
    assert code == 0 and "a 12 GB card" in out


@pytest.mark.parametrize("argv, needles", [
    (["estimate", "sd15", "--set", "batch_size=-3"], ["batch_size = -3", "1 to 256"]),
    (["estimate", "sd15", "--set", "use_lora=false", "--set", "fused_backward=true", "--set", "max_grad_norm=0",
      "--set", "mixed_precision=bf16", "--set", "frozen_dtype=fp8"], ["frozen_dtype", "use_lora"]),
    (["estimate", "sd15", "--set", "optimizer=Prodigy", "--set", "weights_dtype=bf16", "--set",
      "mixed_precision=bf16"], ["Prodigy", "weights_dtype"]),
    (["estimate", "sd15", "--set", "resolution=100", "--json"], ["resolution = 100", "multiple of 64"]),
    (["estimate", "sd15", "--vram", "1e308"], ["--vram", "at most"]),
    (["wizard", "sd15", "--vram", "1e308"], ["--vram", "at most"]),
    (["wizard", "sd15", "--vram", "8", "--resolution", "0"], ["--resolution", "64 to 4096"]),
    (["wizard", "sd15", "--vram", "8", "--resolution", "-512"], ["--resolution", "64 to 4096"]),
    (["wizard", "sd15", "--vram", "8", "--resolution", "100"], ["--resolution", "multiple of 64"]),
    (["wizard", "sd15", "--vram", "8", "--resolution", "8192"], ["--resolution", "64 to 4096"]),
])
def test_cli_refuses_settings_the_trainer_refuses(capsys, argv, needles):
    """Issue 24.3: a negative batch "fitted", refused combinations were estimated, 1e308 GB overflowed."""
    code, out, err = _cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    assert "unexpected" not in err and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_estimate_json_with_vram_gives_a_verdict(capsys):
    """Issue 24.3: --json ignored --vram."""
    code, out, err = _cli(capsys, "estimate", "sd15", "--json", "--vram", "80")
    assert code == 0, err
    data = json.loads(out)
    assert data["vram_gb"] == 80 and data["fits"] is True
    code, out, err = _cli(capsys, "estimate", "sdxl", "--set", "use_lora=false", "--json", "--vram", "1")
    data = json.loads(out)
    assert data["vram_gb"] == 1 and data["fits"] is False
    code, out, err = _cli(capsys, "estimate", "sd15", "--json")
    assert "fits" not in json.loads(out)                # no card named: nothing to compare with


def test_performance_wizard_names_the_empty_concept_folders(sd1, tmp_path):
    """Issue 24.11: connected concepts with 0 images gave "images = 0: ..." naming no folder."""
    from comfyui_dreambooth.nodes import NODE_CLASS_MAPPINGS
    from trainer_fixtures import make_concept

    empty = make_concept(tmp_path / "a", n=0)
    other = make_concept(tmp_path / "b", n=0)
    with pytest.raises(ValueError) as e:
        NODE_CLASS_MAPPINGS["PerformanceWizard"]().choose(sd1, vram_gb=8.0, resolution=64, images=4, mode="lora",
                                                          concept_type="person", concepts=[empty, other])
    assert empty.instance_dir in str(e.value) and other.instance_dir in str(e.value), e.value
    assert "no training images" in str(e.value), e.value


def test_cli_estimate_json_resolves_auto_values_as_the_wizard_does(capsys):
    """Issue 24.11: `estimate --json` showed text_encoder_ratio null where the wizard showed a number."""
    code, out, err = _cli(capsys, "estimate", "sd15", "--json")
    assert code == 0, err
    shown = json.loads(out)["settings"]
    code, out, err = _cli(capsys, "wizard", "sd15", "--vram", "80", "--json")
    wizard = json.loads(out)["settings"]
    assert None not in shown.values(), shown
    assert shown["text_encoder_ratio"] == wizard["text_encoder_ratio"]      # both the "person" preset


# ---- issue 24.1 / 24.2: the wizard keeps an upstream LoRA; it never picks what Imagic refuses --------------------
def test_performance_wizard_keeps_an_upstream_lora_in_mode_auto(sd1):
    """Issue 24.1: mode auto turned a connected LoRA config into a full fine-tune whenever it fitted (SaveLoRA then
    failed after the whole run). The upstream choice is kept; mode full (or lora) says otherwise."""
    from comfyui_dreambooth.nodes import NODE_CLASS_MAPPINGS
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    wizard = NODE_CLASS_MAPPINGS["PerformanceWizard"]()
    config, text = wizard.choose(sd1, vram_gb=80.0, resolution=64, images=4, mode="auto", concept_type="person",
                                 config=DreamBoothSettings(use_lora=True))["result"]
    assert config.use_lora is True, text
    assert "use_lora" in text.splitlines()[1] and "mode full" in text, text
    config, _ = wizard.choose(sd1, vram_gb=80.0, resolution=64, images=4, mode="full", concept_type="person",
                              config=DreamBoothSettings(use_lora=True))["result"]
    assert config.use_lora is False
    config, _ = wizard.choose(sd1, vram_gb=80.0, resolution=64, images=4, mode="auto", concept_type="person",
                              config=DreamBoothSettings(use_lora=False))["result"]
    assert config.use_lora is False                     # an upstream full fine-tune that fits stays one
    config, _ = wizard.choose(sd1, vram_gb=80.0, resolution=64, images=4, mode="auto", concept_type="person")["result"]
    assert config.use_lora is False                     # nothing connected: auto = full when it fits


@pytest.mark.parametrize("mode", ["auto", "lora", "full"])
@pytest.mark.parametrize("vram", [2.0, 4.0, 8.0])
def test_wizard_never_picks_what_imagic_refuses(mode, vram):
    """Issue 24.2: chained after DreamBoothImagic the wizard turned on fused_backward / weights_dtype bf16 /
    frozen_dtype fp8, which the trainer refuses for Imagic."""
    from comfyui_dreambooth.training.settings import DreamBoothSettings
    from comfyui_dreambooth.training.wizard import choose_settings

    base = DreamBoothSettings(train_imagic_only=True)
    r = choose_settings("sd15", vram, images=1, mode=mode, base=base)
    s = r.settings
    assert s.train_imagic_only and not s.fused_backward and s.weights_dtype == "fp32" and s.frozen_dtype == "auto"
    assert s.validate(check_environment=False) == [], r.explanation
    applied = [line for line in r.explanation.splitlines() if line.startswith("- ")]
    assert not any("fused_backward" in line or "fp8" in line for line in applied), r.explanation


def test_estimate_warning_for_imagic_recommends_only_what_imagic_takes(capsys):
    """Issue 24.2: the estimate's WARNING for an Imagic config recommended fused_backward."""
    code, out, err = _cli(capsys, "estimate", "sdxl", "--set", "train_imagic_only=true", "--set", "use_lora=false",
                          "--vram", "2")
    assert code == 0, err
    warning = out.splitlines()[0]
    assert warning.startswith("WARNING") and "fused_backward" not in warning, warning
    assert "Imagic" in warning and "gradient_checkpointing" in warning, warning


# ---- issue 24.4: estimate --workflow follows the chain that feeds each Train node --------------------------------
def _wizard_workflow(tmp_path, order, trains=1):
    """API workflow: Settings (full fine-tune, batch 3) -> PerformanceWizard (mode lora, 8 GB) -> Train, the nodes
    written in `order`; trains=2 adds a second Train node fed by the Settings node directly."""
    nodes = {
        "10": {"class_type": "LoadBaseModel", "inputs": {"model": "x.safetensors"}},
        "11": {"class_type": "DreamBoothSettings", "inputs": {"use_lora": False, "batch_size": 3}},
        "12": {"class_type": "PerformanceWizard", "inputs": {"model": ["10", 0], "config": ["11", 0],
                                                              "vram_gb": 8.0, "resolution": 512, "images": 4,
                                                              "mode": "lora", "concept_type": "person"}},
        "13": {"class_type": "TrainDreamBooth", "inputs": {"model": ["10", 0], "concepts": ["14", 0],
                                                            "config": ["12", 0]}},
        "14": {"class_type": "ConceptDataset", "inputs": {}},
    }
    if trains == 2:
        nodes["15"] = {"class_type": "TrainDreamBooth", "inputs": {"model": ["10", 0], "concepts": ["14", 0],
                                                                    "config": ["11", 0]}, "_meta": {"title": "B"}}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps({k: nodes[k] for k in order + [k for k in nodes if k not in order]}))
    return str(path)


@pytest.mark.parametrize("order", [["11", "12", "13"], ["13", "12", "11"], ["12", "13", "11"]])
def test_cli_estimate_workflow_follows_the_wizard_in_any_node_order(capsys, tmp_path, order):
    """Issue 24.4: a graph with a PerformanceWizard was estimated on its pre-wizard config, or, with the nodes in
    another order, failed with "unexpected KeyError: 'PerformanceWizard'"."""
    from comfyui_dreambooth.training.wizard import choose_settings

    code, out, err = _cli(capsys, "estimate", "sd15", "--workflow", _wizard_workflow(tmp_path, order), "--json")
    assert code == 0, err
    shown = json.loads(out)["settings"]
    assert shown["use_lora"] is True                     # the wizard's mode lora, not the settings' full fine-tune
    expected = choose_settings("sd15", 8.0, images=4, resolution=512, mode="lora").settings
    assert shown["batch_size"] == expected.batch_size and shown["lora_rank"] == expected.lora_rank


def test_cli_estimate_workflow_with_two_train_nodes_estimates_each(capsys, tmp_path):
    """Issue 24.4: a graph with two Train nodes was estimated on the first only."""
    path = _wizard_workflow(tmp_path, ["11", "12", "13"], trains=2)
    code, out, err = _cli(capsys, "estimate", "sd15", "--workflow", path, "--json")
    assert code == 0, err
    trains = json.loads(out)["trains"]
    assert [t["node"] for t in trains] == ["node 13 (TrainDreamBooth)", "node 15 (TrainDreamBooth, 'B')"]
    assert trains[0]["settings"]["use_lora"] is True and trains[1]["settings"]["use_lora"] is False
    assert trains[1]["settings"]["batch_size"] == 3
    code, out, err = _cli(capsys, "estimate", "sd15", "--workflow", path, "--vram", "8")
    assert code == 0, err
    assert "node 13 (TrainDreamBooth):" in out and "node 15 (TrainDreamBooth, 'B'):" in out


# ---- issue 24, fresh hostile pass: the wizard's own inputs -------------------------------------------------------
@pytest.mark.parametrize("change, needle", [
    (dict(vram_gb=-1.0), "vram_gb = -1.0"), (dict(vram_gb=float("nan")), "vram_gb = nan"),
    (dict(vram_gb=float("inf")), "vram_gb = inf"), (dict(vram_gb=1e308), "vram_gb = 1e+308"),
    (dict(resolution=100), "resolution = 100"), (dict(resolution=-64), "resolution = -64"),
    (dict(resolution=8192), "resolution = 8192"),
])
def test_performance_wizard_refuses_a_card_or_resolution_out_of_range(sd1, change, needle):
    """Hostile pass: vram_gb -1 planned "on -1 GB", NaN gave "cannot convert float NaN to integer", inf / 1e308 an
    OverflowError; resolution 100 / -64 / 8192 gave settings the trainer refuses."""
    from comfyui_dreambooth.nodes import NODE_CLASS_MAPPINGS

    inputs = dict(vram_gb=8.0, resolution=64, images=4, mode="auto", concept_type="person") | change
    with pytest.raises(ValueError) as e:
        NODE_CLASS_MAPPINGS["PerformanceWizard"]().choose(sd1, **inputs)
    assert needle in str(e.value) and "\n" not in str(e.value), e.value


def test_cli_estimate_workflow_wizard_with_left_out_widgets_uses_their_defaults(capsys, tmp_path):
    """Hostile pass: a PerformanceWizard written without its widgets ended in "unexpected TypeError"."""
    nodes = {"1": {"class_type": "PerformanceWizard", "inputs": {"model": ["9", 0]}},
             "2": {"class_type": "TrainDreamBooth", "inputs": {"config": ["1", 0]}},
             "9": {"class_type": "LoadBaseModel", "inputs": {}}}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(nodes))
    code, out, err = _cli(capsys, "estimate", "sd15", "--workflow", str(path), "--vram", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["settings"]["resolution"] == 512          # the node's default: the family's own
