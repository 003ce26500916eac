"""training/setup/adapters.py: peft adapters on tiny SD models — copies, targets, resume state, merging."""
import pytest

torch = pytest.importorskip("torch")

from comfyui_dreambooth.training.models.tiny import build_tiny_model  # noqa: E402
from comfyui_dreambooth.training.setup import adapters as A  # noqa: E402

LORA_TYPES = A.LORA_TYPES


pytestmark = pytest.mark.usefixtures("single_thread")   # conftest: one torch thread for this module


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_model("sdxl")


def _unet_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    enc = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if model.family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g)}
    return x, torch.tensor([10, 500]), enc, kwargs


def _unet_out(model, unet=None, seed=0):
    x, t, enc, kwargs = _unet_inputs(model, seed)
    with torch.no_grad():
        return (unet or model.unet)(x, t, enc, **kwargs).sample


def _te_out(te, seed=0):
    ids = torch.randint(0, 49000, (2, 77), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return te(ids).last_hidden_state


def _perturb(model, seed=1, scale=0.1):
    """Give the (zero-initialised) adapters non-trivial values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in A.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------
def test_add_adapters_never_touches_the_received_model(sd1):
    before_unet, before_te = _snapshot(sd1.unet), _snapshot(sd1.text_encoders[0])
    model = A.add_adapters(sd1, rank=4, on_text_encoder=True)
    _perturb(model)
    assert model is not sd1 and model.unet is not sd1.unet and model.text_encoders[0] is not sd1.text_encoders[0]
    assert model.vae is sd1.vae                               # untouched parts are shared, not copied
    assert not A.has_adapters(sd1) and A.has_adapters(model)
    assert "adapter" not in sd1.metadata
    for ref, module in ((before_unet, sd1.unet), (before_te, sd1.text_encoders[0])):
        now = module.state_dict()
        assert set(now) == set(ref)
        assert all(torch.equal(now[k], ref[k]) for k in ref)


@pytest.mark.parametrize("lora_type", LORA_TYPES)
def test_fresh_adapter_is_a_no_op_and_only_adapters_train(sd1, lora_type):
    model = A.add_adapters(sd1, rank=4, alpha=2, lora_type=lora_type, on_text_encoder=True)
    assert torch.allclose(_unet_out(model), _unet_out(sd1), atol=1e-5)
    assert torch.allclose(_te_out(model.text_encoders[0]), _te_out(sd1.text_encoders[0]), atol=1e-5)
    trainable = {n for n, p in model.unet.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in A.adapter_parameters(model))
    assert len(A.adapter_parameters(model)) == len(A.adapter_parameters(model, text_encoders=False)) + \
        len(A.adapter_parameters(model, unet=False))


def test_default_targets_are_kohyas_transformer_layers(sd1, sdxl):
    names = A.unet_target_names(sd1.unet)
    suffixes = {n.split("attentions.")[1].split(".", 1)[1] for n in names}
    suffixes = {s.replace("transformer_blocks.0.", "") for s in suffixes}
    assert suffixes == {"proj_in", "proj_out", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"}
    attention_only = A.unet_target_names(sd1.unet, "attention")
    assert set(attention_only) < set(names) and len(attention_only) == len(names) * 8 // 12
    # SDXL: two text encoders, one with and one without transformers' "text_model." level
    for te in sdxl.text_encoders:
        te_names = A.text_encoder_target_names(te)
        assert len(te_names) == 6 * te.config.num_hidden_layers
    assert len(A.text_encoder_target_names(sdxl.text_encoders[0], "attention")) == 4 * 2


def test_same_seed_same_init_and_global_rng_untouched(sd1):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = A.add_adapters(sd1, rank=4, seed=7)
    assert torch.equal(torch.rand(1), expected_next)        # the adapter init did not consume the global RNG
    b = A.add_adapters(sd1, rank=4, seed=7)
    c = A.add_adapters(sd1, rank=4, seed=8)
    pa, pb, pc = (A.adapter_parameters(m) for m in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert any(not torch.equal(x, z) for x, z in zip(pa, pc))


def test_adapters_train_on_a_model_loaded_under_inference_mode():
    """ComfyUI runs every node under torch.inference_mode(): the loaded weights are inference tensors."""
    with torch.inference_mode():
        base = build_tiny_model("sd1")
        model = A.add_adapters(base, rank=2, on_text_encoder=True)
    x, t, enc, kwargs = _unet_inputs(model)
    loss = model.unet(x, t, enc, **kwargs).sample.pow(2).mean()
    loss = loss + model.text_encoders[0](torch.ones(1, 77, dtype=torch.long)).last_hidden_state.pow(2).mean()
    loss.backward()
    grads = [p.grad for p in A.adapter_parameters(model)]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_half_precision_base_keeps_fp32_adapters(sd1):
    import copy

    half = sd1.replace(unet=copy.deepcopy(sd1.unet).half())
    model = A.add_adapters(half, rank=4)
    assert all(p.dtype == torch.float32 for p in A.adapter_parameters(model))
    assert model.unet.conv_in.weight.dtype == torch.float16


def test_validation_reports_every_problem(sd1):
    with pytest.raises(ValueError) as err:
        A.add_adapters(sd1, rank=0, alpha=-1, dropout=1.5, lora_type="ia3", on_unet=False, on_text_encoder=False)
    message = str(err.value)
    for fragment in ("lora_type='ia3'", "lora_rank=0", "lora_alpha=-1", "lora_dropout=1.5", "neither"):
        assert fragment in message


def test_adding_twice_is_refused(sd1):
    model = A.add_adapters(sd1, rank=2)
    with pytest.raises(ValueError, match="already carries adapters"):
        A.add_adapters(model, rank=2)


def test_alpha_defaults_to_rank_and_is_recorded(sd1):
    model = A.add_adapters(sd1, rank=6, lora_type="dora", on_text_encoder=True)
    cfg = A.adapter_config(model)
    assert (cfg.rank, cfg.alpha, cfg.lora_type, cfg.on_text_encoder) == (6, 6.0, "dora", True)
    assert A.adapter_config(sd1) is None


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora_type", LORA_TYPES)
def test_adapter_state_rebuilds_the_same_model_from_the_base(sd1, lora_type, tmp_path):
    from safetensors.torch import load_file, save_file

    model = A.add_adapters(sd1, rank=4, alpha=3, lora_type=lora_type, on_text_encoder=True, seed=3)
    _perturb(model)
    state = A.adapter_state(model)
    path = str(tmp_path / "adapter.safetensors")
    save_file(state["tensors"], path, metadata=A.adapter_state_metadata(state))
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    restored_state = A.state_from_file_parts(load_file(path), metadata)
    resumed = A.load_adapter_state(sd1, restored_state)
    assert A.adapter_config(resumed) == A.adapter_config(model)
    assert torch.equal(_unet_out(resumed), _unet_out(model))
    assert torch.equal(_te_out(resumed.text_encoders[0]), _te_out(model.text_encoders[0]))
    assert not A.has_adapters(sd1)


def test_load_adapter_state_in_place_and_mismatch_errors(sd1):
    trained = A.add_adapters(sd1, rank=4)
    _perturb(trained)
    state = A.adapter_state(trained)
    fresh = A.add_adapters(sd1, rank=4)
    same = A.load_adapter_state(fresh, state)
    assert same is fresh and torch.equal(_unet_out(fresh), _unet_out(trained))
    other = A.add_adapters(sd1, rank=8)
    with pytest.raises(ValueError, match="rank"):
        A.load_adapter_state(other, state)
    broken = dict(state, tensors={k: v for i, (k, v) in enumerate(state["tensors"].items()) if i})
    with pytest.raises(ValueError, match="missing"):
        A.load_adapter_state(A.add_adapters(sd1, rank=4), broken)
    with pytest.raises(ValueError, match="not an adapter state"):
        A.load_adapter_state(sd1, {"format": "x"})
    with pytest.raises(ValueError, match="no adapters"):
        A.adapter_state(sd1)


def test_ema_adapter_state_round_trip(sd1):
    import copy

    model = A.add_adapters(sd1, rank=2)
    _perturb(model)
    ema = copy.deepcopy(model.unet)
    with torch.no_grad():
        for name, p in ema.named_parameters():
            if ".default" in name:
                p.mul_(0.5)
    model = model.replace(ema_unet=ema)
    resumed = A.load_adapter_state(sd1, A.adapter_state(model))
    assert resumed.ema_unet is not None
    assert torch.equal(_unet_out(resumed, resumed.ema_unet), _unet_out(model, model.ema_unet))


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora_type", LORA_TYPES)
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merged_copy_matches_adapter_outputs(sd1, sdxl, family, lora_type):
    base = sd1 if family == "sd1" else sdxl
    model = A.add_adapters(base, rank=4, alpha=2, lora_type=lora_type, on_text_encoder=True)
    _perturb(model)
    merged = A.merged_copy(model)
    assert not A.has_adapters(merged) and A.has_adapters(model)
    assert merged.metadata["merged_adapter"]["lora_type"] == lora_type and "adapter" not in merged.metadata
    assert torch.allclose(_unet_out(merged), _unet_out(model), atol=1e-4)
    assert not torch.allclose(_unet_out(merged), _unet_out(base), atol=1e-3)
    for te_merged, te_adapted in zip(merged.text_encoders, model.text_encoders):
        assert torch.allclose(_te_out(te_merged), _te_out(te_adapted), atol=1e-4)
    # the merged modules are plain diffusers/transformers modules with the original parameter names
    assert set(merged.unet.state_dict()) == set(base.unet.state_dict())
    assert set(merged.text_encoders[0].state_dict()) == set(base.text_encoders[0].state_dict())
    assert A.merged_copy(base) is base


def test_merged_copy_of_half_model_folds_in_fp32(sd1):
    import copy

    half = sd1.replace(unet=copy.deepcopy(sd1.unet).half())
    model = A.add_adapters(half, rank=4)
    _perturb(model, scale=1e-3)
    merged = A.merged_copy(model)
    layer = merged.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.weight.dtype == torch.float16
    adapted = A.adapted_layers(model.unet)["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    expected = (adapted.get_base_layer().weight.float() + adapted.get_delta_weight("default")).half()
    assert torch.equal(layer.weight, expected)
