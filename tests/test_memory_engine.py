"""The memory engine (issue 11): fused_backward, weights_dtype (bf16 + stochastic rounding), Adafactor /
AdamW8bit with them, frozen_dtype (fp8 storage), frozen parts off the accelerator, validation of impossible
combinations. Memory itself is measured by bench/memory.py, not here."""
import copy
import itertools
import os

import pytest
import torch

from trainer_fixtures import load_tensors, make_concept, read_losses, same_tensors, tiny_settings

pytestmark = pytest.mark.usefixtures("single_thread")

HAS_BNB = __import__("importlib").util.find_spec("bitsandbytes") is not None


def _train(model, root, settings, concept, **kw):
    from comfyui_dreambooth.training.trainer import train

    return train(model, [concept], settings, output_root=str(root), **kw)


def _final(run_dir):
    return load_tensors(os.path.join(run_dir, "final", "trainable.safetensors"))


# ---- fused_backward: exactly the unfused step ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["AdamW", "SGD", "Adafactor"])
def test_fused_backward_is_bit_identical_to_the_plain_step(sd1, tmp_path, optimizer):
    """Full fine-tune, fp32 on the CPU, 4 steps: the same weights to the bit (and the same loss curve)."""
    concept = make_concept(tmp_path, n=2)
    base = dict(use_lora=False, optimizer=optimizer, learning_rate=1e-3, max_grad_norm=0.0,
                lr_scheduler="linear", text_encoder_ratio=0.5)
    plain = _train(sd1, tmp_path / "a", tiny_settings(**base), concept)
    fused = _train(sd1, tmp_path / "b", tiny_settings(**base, fused_backward=True), concept)
    assert plain.steps == fused.steps == 4
    assert [r["loss"] for r in read_losses(plain.run_dir)] == [r["loss"] for r in read_losses(fused.run_dir)]
    assert same_tensors(_final(plain.run_dir), _final(fused.run_dir))
    # the hooks are gone from the returned model: it holds no optimizer
    assert all(not p._post_accumulate_grad_hooks for p in fused.model.unet.parameters()
               if getattr(p, "_post_accumulate_grad_hooks", None) is not None)


def test_fused_backward_frees_each_gradient_during_backward(sd1, tmp_path, monkeypatch):
    """When the UNet's first layer receives its gradient, the weights stepped before it hold no gradient."""
    from comfyui_dreambooth.training.setup import fused

    seen = []
    real = fused.PerParameterOptimizer._hook

    def hook(self, p):
        real(self, p)
        seen.append(sum(q.grad is not None for q in self._params))

    monkeypatch.setattr(fused.PerParameterOptimizer, "_hook", hook)
    concept = make_concept(tmp_path, n=1)
    _train(sd1, tmp_path / "o", tiny_settings(use_lora=False, max_grad_norm=0.0, fused_backward=True,
                                              steps_per_image=1), concept)
    assert seen and max(seen) == 0


@pytest.mark.slow
def test_fused_backward_resumes_bit_identically(sd1, tmp_path):
    from comfyui_dreambooth.training.trainer import TrainCallbacks, TrainingInterrupted

    concept = make_concept(tmp_path, n=2)
    settings = tiny_settings(use_lora=False, learning_rate=1e-3, max_grad_norm=0.0, fused_backward=True,
                             lr_scheduler="cosine")
    whole = _train(sd1, tmp_path / "whole", settings, concept)
    done = {"step": 0}
    cb = TrainCallbacks(progress=lambda p: done.update(step=p["step"]), should_stop=lambda: done["step"] >= 1)
    with pytest.raises(TrainingInterrupted):
        _train(sd1, tmp_path / "split", settings, concept, callbacks=cb)
    resumed = _train(sd1, tmp_path / "split", settings, concept)
    assert resumed.steps == 4
    assert same_tensors(_final(whole.run_dir), _final(resumed.run_dir))


def test_fused_backward_stops_on_nan_before_stepping(sd1, tmp_path, monkeypatch):
    from comfyui_dreambooth.training.setup import noise
    from comfyui_dreambooth.training.trainer import TrainingDiverged

    calls = {"n": 0}
    real = noise.per_sample_mse

    def mse(pred, target):
        calls["n"] += 1
        out = real(pred, target)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(noise, "per_sample_mse", mse)
    stepped = []
    from comfyui_dreambooth.training.setup import fused

    real_step = fused.PerParameterOptimizer._step_one
    monkeypatch.setattr(fused.PerParameterOptimizer, "_step_one",
                        lambda self, p: (stepped.append(calls["n"]), real_step(self, p))[1])
    concept = make_concept(tmp_path, n=1)
    with pytest.raises(TrainingDiverged, match="step 3"):
        _train(sd1, tmp_path / "out", tiny_settings(use_lora=False, max_grad_norm=0.0, fused_backward=True,
                                                    steps_per_image=5, save_every_epochs=1), concept)
    assert stepped and max(stepped) == 2          # nothing was stepped with the NaN loss


# ---- bf16 weights with stochastic rounding ----------------------------------------------------------------------
def test_stochastic_rounding_is_unbiased_and_seeded():
    from comfyui_dreambooth.training.setup.fused import stochastic_round_to_bf16

    x = torch.linspace(1.0, 1.0078125, 200001)[:-1]           # between two neighbouring bf16 values
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    r = stochastic_round_to_bf16(x, gen())
    assert r.dtype == torch.bfloat16 and set(r.float().unique().tolist()) <= {1.0, 1.0078125}
    assert abs(r.float().mean().item() - x.mean().item()) < 2e-5
    assert torch.equal(r, stochastic_round_to_bf16(x, gen()))
    neg = stochastic_round_to_bf16(-x, gen())
    assert abs(neg.float().mean().item() + x.mean().item()) < 2e-5


def _run_tiny_updates(weights_dtype, steps=10, lr=1e-6, plain_bf16=False):
    """AdamW on 100k weights in [1e-3, 2e-3) with gradient 1: each step moves every weight by ~lr."""
    from comfyui_dreambooth.training.settings import DreamBoothSettings
    from comfyui_dreambooth.training.setup.fused import PerParameterOptimizer
    from comfyui_dreambooth.training.setup.optimizers import build_optimizer

    w0 = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 1e-3 + 1e-3
    settings = DreamBoothSettings(optimizer="AdamW", learning_rate=lr, weight_decay=0.0,
                                  weights_dtype=weights_dtype, mixed_precision="bf16")
    p = torch.nn.Parameter(w0.to(torch.bfloat16) if weights_dtype == "bf16" else w0.clone())
    start = p.detach().float().clone()
    opt = (build_optimizer([p], settings) if plain_bf16 else
           PerParameterOptimizer([{"params": [p], "lr": lr}], settings, fused=False, seed=1))
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
        opt.zero_grad()
    return p.detach().float() - start


def test_bf16_weights_move_like_fp32_at_lr_1e_6():
    fp32 = _run_tiny_updates("fp32")
    sr = _run_tiny_updates("bf16")
    plain = _run_tiny_updates("bf16", plain_bf16=True)
    assert fp32.mean().item() == pytest.approx(-1e-5, rel=0.01)
    assert sr.mean().item() == pytest.approx(fp32.mean().item(), rel=0.05)
    assert (plain == 0).float().mean().item() > 0.9                 # plain bf16 rounding loses the updates
    assert (sr != 0).float().mean().item() > 0.5


# ---- every combination trains and exports ----------------------------------------------------------------------
def _combinations():
    """Each mode with every fused_backward x weights_dtype pair (AdamW), each other optimizer fused, and fp8
    under a LoRA with the other savers on: every setting value meets every other at least once, quickly."""
    out = []
    for use_lora in (True, False):
        out += [(use_lora, fused, wdt, "AdamW", "auto") for fused, wdt in itertools.product((False, True),
                                                                                          ("fp32", "bf16"))]
        out += [(use_lora, True, "bf16" if opt == "Adafactor" else "fp32", opt, "auto")
                for opt in ("Adafactor", "SGD", "AdamW8bit")]
    out.append((True, True, "bf16", "AdamW", "fp8"))
    out.append((True, False, "fp32", "AdamW", "fp8"))
    return out


COMBINATION_STEPS = 8     # bf16 matmuls are slow on a CPU: enough steps to see the loss fall, no more


def _combination_settings(use_lora, fused, wdt, optimizer, frozen):
    lr = {"SGD": 0.5 if use_lora else 0.2, "Adafactor": 3e-2 if use_lora else 3e-3}.get(
        optimizer, 2e-2 if use_lora else 1e-3)
    return tiny_settings(use_lora=use_lora, learning_rate=lr, steps_per_image=0, max_train_steps=COMBINATION_STEPS,
                         optimizer=optimizer, fused_backward=fused, weights_dtype=wdt, frozen_dtype=frozen,
                         max_grad_norm=0.0 if fused else 1.0, mixed_precision="bf16" if wdt == "bf16" else "no")


@pytest.fixture(scope="module")
def combination_runs(tmp_path_factory):
    """Every combination's run, trained two at a time in worker processes (tests/memory_engine_worker.py: the same
    train + export each test used to do in turn, on one thread each), the slow bf16 ones first. combination ->
    (Future of the worker's answer, the run's folder)."""
    from memory_engine_worker import start_pool, train_and_export

    combos = [c for c in _combinations() if c[3] != "AdamW8bit" or HAS_BNB]
    runs = {}
    with start_pool(2) as pool:
        for combo in sorted(combos, key=lambda c: c[2] != "bf16"):         # stable: bf16 first, else in order
            root = tmp_path_factory.mktemp("combination")
            concept = make_concept(root, n=4)
            future = pool.submit(train_and_export, _combination_settings(*combo), concept, str(root / "out"),
                                 str(root / "x.safetensors"), combo[0])
            runs[combo] = (future, root)
        yield runs
        pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("use_lora, fused, wdt, optimizer, frozen", _combinations(),
                         ids=lambda v: str(v))
@pytest.mark.slow
def test_every_combination_trains_with_falling_loss_and_exports(combination_runs, use_lora, fused, wdt, optimizer,
                                                               frozen):
    if optimizer == "AdamW8bit" and not HAS_BNB:
        pytest.skip("bitsandbytes is not installed (optional)")
    from comfyui_dreambooth.training.export.lora import load_kohya_lora
    from comfyui_dreambooth.training.models import load_model

    future, root = combination_runs[(use_lora, fused, wdt, optimizer, frozen)]
    result = future.result()          # trained with _combination_settings(...) and exported (fp16) to x.safetensors
    losses = [r["loss"] for r in read_losses(result["run_dir"])]
    assert len(losses) == COMBINATION_STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, losses
    path = str(root / "x.safetensors")
    if use_lora:
        state, _ = load_kohya_lora(path)
        assert state and all(torch.isfinite(t.float()).all() for t in state.values())
    else:
        back = load_model(path)
        assert all(torch.isfinite(p.float()).all() for p in back.unet.parameters())
    # the trained model's frozen base is back in full precision after fp8 training
    assert not any(d == str(getattr(torch, "float8_e4m3fn", None)) for d in result["unet_dtypes"])


# ---- fp8 frozen storage and frozen parts off the accelerator --------------------------------------------------
def test_fp8_storage_keeps_frozen_weights_in_float8_during_training(sd1, tmp_path, monkeypatch):
    from comfyui_dreambooth.training.setup import precision

    seen = {}
    real = precision.apply_fp8_storage

    def spy(module, compute):
        n = real(module, compute)
        seen["n"] = n
        seen["dtypes"] = {p.dtype for p in module.parameters() if not p.requires_grad and p.dim() > 1}
        seen["trained"] = {p.dtype for p in module.parameters() if p.requires_grad}
        return n

    monkeypatch.setattr(precision, "apply_fp8_storage", spy)
    before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    result = _train(sd1, tmp_path / "o", tiny_settings(frozen_dtype="fp8", steps_per_image=1,
                                                      learning_rate=2e-2), make_concept(tmp_path, n=2))
    assert seen["n"] > 10 and seen["dtypes"] == {torch.float8_e4m3fn} and seen["trained"] == {torch.float32}
    assert all(torch.equal(before[k], v) for k, v in sd1.unet.state_dict().items())    # received model untouched
    merged = {k: v for k, v in result.model.unet.state_dict().items() if "base_layer.weight" in k}
    key = next(iter(merged))
    assert torch.equal(merged[key], before[key.replace(".base_layer", "")])          # full precision again


def test_frozen_parts_leave_the_accelerator_after_caching(sd1, tmp_path, monkeypatch):
    """On an accelerator, once latents and text embeddings are cached, the VAE and the frozen text encoder go to
    the CPU and previews bring them back. Checked here by recording the moves offload_frozen makes."""
    from comfyui_dreambooth.training.setup import precision

    moves = []

    class Spy(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def to(self, *a, **k):
            moves.append((self.name, str(a[0])))
            return self

    tm = type("TM", (), {})()
    tm.vae, tm.text_encoders = Spy("vae"), [Spy("te")]
    settings = tiny_settings()
    accel = torch.device("cuda")
    moved = precision.offload_frozen(tm, settings, accel, te_trained=False, text_cached=True, latents_cached=True)
    assert moves == [("vae", "cpu"), ("te", "cpu")] and len(moved) == 2
    moves.clear()
    with precision.frozen_on(accel, moved):
        assert moves == [("vae", "cuda"), ("te", "cuda")]
    assert moves[-2:] == [("vae", "cpu"), ("te", "cpu")]
    moves.clear()
    # a trained text encoder, or latents encoded every step, stay where training needs them
    assert precision.offload_frozen(tm, settings, accel, te_trained=True, text_cached=False,
                                    latents_cached=False) == []
    assert precision.offload_frozen(tm, settings, torch.device("cpu"), te_trained=False, text_cached=True,
                                    latents_cached=True) == [] and moves == []
    # and in a real run the trainer calls it with what was cached (CPU: nothing moves, training unchanged)
    calls = []
    real = precision.offload_frozen
    monkeypatch.setattr(precision, "offload_frozen", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    _train(sd1, tmp_path / "o", tiny_settings(steps_per_image=1), make_concept(tmp_path, n=1))
    assert calls == [dict(te_trained=False, text_cached=True, latents_cached=True)]


# ---- validation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, names", [
    (dict(fused_backward=True, gradient_accumulation_steps=2, max_grad_norm=0.0, mixed_precision="bf16"),
     ("fused_backward", "gradient_accumulation_steps")),
    (dict(fused_backward=True, max_grad_norm=1.0, mixed_precision="bf16"), ("fused_backward", "max_grad_norm")),
    (dict(fused_backward=True, max_grad_norm=0.0, mixed_precision="fp16"), ("fused_backward", "mixed_precision")),
    (dict(fused_backward=True, max_grad_norm=0.0, mixed_precision="bf16", optimizer="Prodigy", learning_rate=1.0),
     ("fused_backward", "Prodigy")),
    (dict(weights_dtype="bf16", mixed_precision="no"), ("weights_dtype", "mixed_precision")),
    (dict(frozen_dtype="fp8", use_lora=False), ("frozen_dtype", "use_lora")),
    (dict(frozen_dtype="fp16", mixed_precision="bf16"), ("frozen_dtype", "mixed_precision")),
    (dict(frozen_dtype="bf16", mixed_precision="no"), ("frozen_dtype", "mixed_precision")),
])
def test_impossible_combinations_are_refused_naming_both_settings(changes, names):
    from comfyui_dreambooth.training.settings import DreamBoothSettings

    problems = DreamBoothSettings(**changes).validate(check_environment=False)
    assert len(problems) == 1, problems
    assert all(n in problems[0] for n in names), problems


@pytest.mark.parametrize("frozen", ["fp16", "bf16"])
def test_half_frozen_weights_on_the_cpu_name_the_cpu_and_a_fix_that_works_there(sd1, tmp_path, frozen):
    """Issue 24.7: the CPU turns mixed_precision fp16 into 'no'; the refusal must say so, not ask for fp16."""
    from comfyui_dreambooth.training.settings import SettingsError

    with pytest.raises(SettingsError) as e:
        _train(sd1, tmp_path / "o", tiny_settings(mixed_precision="fp16", frozen_dtype=frozen, steps_per_image=1),
               make_concept(tmp_path, n=1), device="cpu")
    message = str(e.value)
    assert "CPU" in message and "fp32" in message and "frozen_dtype 'auto'" in message and "GPU" in message, message
    assert "set mixed_precision to 'fp16'" not in message and "set mixed_precision to" not in message, message


def test_memory_settings_at_defaults_keep_old_run_hashes():
    from comfyui_dreambooth.training.settings import MEMORY_ENGINE_FIELDS, DreamBoothSettings

    s = DreamBoothSettings()
    assert not set(MEMORY_ENGINE_FIELDS) & set(s.result_dict())
    assert s.replace(fused_backward=True).config_hash() != s.config_hash()


def test_adafactor_uses_the_settings_learning_rate():
    from comfyui_dreambooth.training.settings import DreamBoothSettings
    from comfyui_dreambooth.training.setup.optimizers import build_optimizer

    p = torch.nn.Parameter(torch.ones(64, 64))
    opt = build_optimizer([p], DreamBoothSettings(optimizer="Adafactor", learning_rate=1e-3, weight_decay=0.0))
    g = opt.param_groups[0]
    assert (g["relative_step"], g["scale_parameter"], g["warmup_init"], g["lr"]) == (False, False, False, 1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    # factored second moment (row / column), and an update of size lr (RMS of the update clipped to 1 x lr)
    state = opt.state[p]
    assert "exp_avg_sq_row" in state and "exp_avg_sq" not in state
    assert torch.allclose(p.detach(), torch.full_like(p, 1 - 1e-3), atol=1e-7)
