"""Sampling: every scheduler runs and is deterministic, ComfyUI IMAGE layout, clip skip, interrupt."""
import pytest
import torch

from comfyui_dreambooth.training.models.text import encode_prompts, sdxl_time_ids, tokens_over_limit
from comfyui_dreambooth.training.sampling import SCHEDULERS, SamplingInterrupted, generate

KW = dict(steps=2, width=32, height=32)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_each_scheduler_runs_and_is_deterministic(tiny_models, scheduler):
    model = tiny_models["sd1"]
    a = generate(model, "a photo of sks dog", seed=3, scheduler=scheduler, batch_size=2, **KW)
    b = generate(model, ["a photo of sks dog", "a photo of sks dog"], seed=3, scheduler=scheduler, **KW)
    assert a.shape == (2, 32, 32, 3) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    # image i depends only on seed + i (up to batched-kernel rounding): batch image 2 = single image at seed + 1
    c = generate(model, "a photo of sks dog", seed=4, scheduler=scheduler, **KW)
    assert torch.allclose(a[1:], c, atol=1e-4)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_families_sample(tiny_models, family):
    out = generate(tiny_models[family], "a photo of sks dog", negative_prompt="blurry", seed=1, **KW)
    assert out.shape == (1, 32, 32, 3)
    assert not torch.equal(out, generate(tiny_models[family], "a photo of sks dog", seed=2, **KW))


def test_clip_skip_is_honoured(tiny_models):
    model = tiny_models["sd1"]
    e1 = encode_prompts(model, ["a photo of sks dog"], clip_skip=1).embeds
    e2 = encode_prompts(model, ["a photo of sks dog"], clip_skip=2).embeds
    assert e1.shape == e2.shape == (1, 77, 32) and not torch.allclose(e1, e2)
    out = model.text_encoders[0](model.tokenizers[0](["a photo of sks dog"], padding="max_length",
                                                      max_length=77, return_tensors="pt").input_ids,
                                 output_hidden_states=True)
    assert torch.allclose(e1, out.last_hidden_state)
    assert torch.allclose(e2, model.text_encoders[0].text_model.final_layer_norm(out.hidden_states[-2])
                          if hasattr(model.text_encoders[0], "text_model")
                          else model.text_encoders[0].final_layer_norm(out.hidden_states[-2]))
    i1 = generate(model, "a photo of sks dog", clip_skip=1, **KW)
    i2 = generate(model, "a photo of sks dog", clip_skip=2, **KW)
    assert not torch.equal(i1, i2)


def test_sdxl_embeddings_and_time_ids(tiny_models):
    model = tiny_models["sdxl"]
    te = encode_prompts(model, ["a", "b"])
    assert te.embeds.shape == (2, 77, 64) and te.pooled.shape == (2, 32)
    assert sdxl_time_ids((512, 768), (0, 32), (512, 512)).tolist() == [512, 768, 0, 32, 512, 512]


def test_long_prompts_truncate_or_chunk(tiny_models):
    model = tiny_models["sd1"]
    prompt = " ".join(["dog"] * 100)
    assert tokens_over_limit(model, prompt) == 25 and tokens_over_limit(model, "a dog") == 0
    assert encode_prompts(model, [prompt]).embeds.shape[1] == 77
    chunked = encode_prompts(model, [prompt, "a cat"], long_prompts="chunk").embeds
    assert chunked.shape[1] == 154
    # a long negative prompt makes the positive padded to the same number of windows
    assert generate(model, "a cat", negative_prompt=prompt, long_prompts="chunk", **KW).shape == (1, 32, 32, 3)


def test_progress_and_interrupt(tiny_models):
    seen = []
    generate(tiny_models["sd1"], "x", progress=lambda d, t: seen.append((d, t)), steps=3, width=32, height=32)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(SamplingInterrupted):
        generate(tiny_models["sd1"], "x", should_stop=lambda: True, **KW)


def test_bad_arguments(tiny_models):
    with pytest.raises(ValueError, match="multiples of"):
        generate(tiny_models["sd1"], "x", steps=1, width=30, height=32)
    with pytest.raises(ValueError, match="scheduler"):
        generate(tiny_models["sd1"], "x", scheduler="nope", **KW)
