"""prepare_training_data end to end on tiny models: plan, batches, caches, class images, report."""
import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_dreambooth.training.data.dataset import DatasetError, PreparationStopped
from comfyui_dreambooth.training.data.prepare import prepare_training_data
from comfyui_dreambooth.training.data.settings import ConceptSettings, DataSettings
from comfyui_dreambooth.training.models.tiny import build_tiny_model

SIZES = [(128, 128), (256, 96), (96, 256), (130, 120), (256, 60)]   # five aspect ratios (at resolution 128)
SMALL = [(64, 64), (80, 64), (64, 70), (64, 64), (90, 90)]           # one 64x64 bucket: fast to encode


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_model("sdxl")


def make_images(folder, sizes=SMALL, captions=None, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        path = os.path.join(folder, f"{i:03d}-a dog.png")
        Image.fromarray(arr).save(path)
        if captions:
            with open(path[:-4] + ".txt", "w") as f:
                f.write(captions[i])
        paths.append(path)
    return paths


def wide(**kw):
    return settings(resolution=128, bucket_max_side=256, **kw)


def settings(**kw):
    base = dict(resolution=64, bucket_min_side=64, bucket_max_side=128)
    base.update(kw)
    return DataSettings(**base)


def prepare(model, concepts, data, cache_dir, **kw):
    args = dict(cache_dir=str(cache_dir), text_encoder_trained=False, batch_size=2, gradient_accumulation_steps=1,
                seed=0)
    args.update(kw)
    return prepare_training_data(model, concepts, data, **args)


def test_batches_have_everything_the_trainer_needs(sd1, tmp_path):
    make_images(tmp_path / "inst")
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks", class_token="dog",
                              repeats=2)
    data = prepare(sd1, [concept], settings(), tmp_path / "cache")
    plan = data.epoch_plan(0)
    assert len(plan) == data.batches_per_epoch == data.report.batches_per_epoch
    g = torch.Generator().manual_seed(0)
    for item in plan:
        batch = data.load_batch(item, device="cpu", dtype=torch.float32, generator=g)
        w, h = item.bucket
        assert batch.latents.shape == (len(item.items), 4, h // 2, w // 2)
        assert batch.embeds.shape == (len(item.items), 77, 32) and batch.pooled is None
        assert batch.time_ids is None
        assert batch.captions and all(c == "a sks dog" for c in batch.captions)
        assert batch.is_prior.dtype == torch.bool and not batch.is_prior.any()
        assert torch.equal(batch.loss_weights, torch.ones(len(item.items)))
        assert not batch.latents.requires_grad and not batch.latents.is_inference()


def test_epoch_plan_is_deterministic_single_bucket_and_complete(sd1, tmp_path):
    make_images(tmp_path / "inst")
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks", repeats=3)
    data = prepare(sd1, [concept], settings(), tmp_path / "cache", batch_size=2)
    again = prepare(sd1, [concept], settings(), tmp_path / "cache", batch_size=2)
    for epoch in range(3):
        plan = data.epoch_plan(epoch)
        assert plan == again.epoch_plan(epoch)       # resume: a fresh process plans the same batches
        assert len(plan) == data.batches_per_epoch
        counts = {}
        for item in plan:
            assert all(data.items[i].bucket == item.bucket for i in item.items)
            for i in item.items:
                counts[i] = counts.get(i, 0) + 1
        assert set(counts.values()) == {3} and len(counts) == len(SMALL)
    assert data.epoch_plan(0) != data.epoch_plan(1)
    other_seed = prepare(sd1, [concept], settings(), tmp_path / "cache", batch_size=2, seed=1)
    assert other_seed.epoch_plan(0) != data.epoch_plan(0)
    skipped = [p for p, _ in data.iter_epoch(1, skip=2, device="cpu")]
    assert skipped == data.epoch_plan(1)[2:]


def test_buckets_are_assigned_from_aspect_ratio(sd1, tmp_path):
    make_images(tmp_path / "inst", sizes=SIZES)
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks")
    data = prepare(sd1, [concept], wide(), tmp_path / "cache", text_encoder_trained=True)
    buckets = {os.path.basename(i.path): i.bucket for i in data.items}
    assert buckets["000-a dog.png"] == (128, 128)
    assert buckets["001-a dog.png"] == (192, 64)
    assert buckets["002-a dog.png"] == (64, 192)
    assert buckets["004-a dog.png"] == (256, 64)
    assert data.report.concepts[0].buckets == {"128x128": 2, "192x64": 1, "64x192": 1, "256x64": 1}


def test_latent_cache_hit_miss_invalidation_and_corruption(sd1, tmp_path):
    paths = make_images(tmp_path / "inst")
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks")
    cache = tmp_path / "cache"
    first = prepare(sd1, [concept], settings(), cache, text_encoder_trained=True)
    assert first.report.cache["latents"]["misses"] == 5 and first.report.cache["latents"]["hits"] == 0
    second = prepare(sd1, [concept], settings(), cache, text_encoder_trained=True)
    assert second.report.cache["latents"]["misses"] == 0 and second.report.cache["latents"]["hits"] == 5
    # one image edited -> only it is encoded again
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(paths[0])
    third = prepare(sd1, [concept], settings(), cache, text_encoder_trained=True)
    assert third.report.cache["latents"]["misses"] == 1 and third.report.cache["latents"]["hits"] == 4
    # a setting that changes the crops -> everything again
    squash = prepare(sd1, [concept], settings(center_crop=False, bucketing=False), cache, text_encoder_trained=True)
    assert squash.report.cache["latents"]["misses"] == 2      # the three square images crop the same either way
    # a corrupt entry is recomputed, not fatal
    entry = third.latent_cache._path(third.latent_key(third.items[1], False))
    with open(entry, "r+b") as f:
        f.truncate(50)
    fourth = prepare(sd1, [concept], settings(), cache, text_encoder_trained=True)
    stats = fourth.report.cache["latents"]
    assert stats["recomputed"] == 1 and stats["misses"] == 1
    assert not [f for f in (cache / "latents").rglob("*") if f.name.endswith(".tmp")]
    # another VAE -> other keys
    other = sd1.replace(vae=build_tiny_model("sd1", seed=1).vae)
    assert prepare(other, [concept], settings(), cache, text_encoder_trained=True).report.cache["latents"]["hits"] == 0


def test_memory_cache_writes_nothing(sd1, tmp_path):
    make_images(tmp_path / "inst")
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks")
    data = prepare(sd1, [concept], settings(cache_mode="memory"), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    assert data.report.cache["latents"]["mode"] == "memory"
    data.load_batch(data.epoch_plan(0)[0], device="cpu")


def test_cached_latents_sample_the_posterior_like_fresh_ones(sd1, tmp_path):
    make_images(tmp_path / "inst", sizes=[(64, 64)] * 2, seed=3)
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks")
    cached = prepare(sd1, [concept], settings(), tmp_path / "cache", text_encoder_trained=True, batch_size=2)
    fresh = prepare(sd1, [concept], settings(cache_latents=False), tmp_path / "cache", text_encoder_trained=True,
                    batch_size=2)
    item = cached.epoch_plan(0)[0]
    a = cached.load_batch(item, generator=torch.Generator().manual_seed(7)).latents
    b = fresh.load_batch(item, generator=torch.Generator().manual_seed(7)).latents
    c = cached.load_batch(item, generator=torch.Generator().manual_seed(8)).latents
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c)                       # the VAE sample is not frozen by caching
    # scaled by the VAE factor: equals (mean + std * noise) * 0.18215
    stats = cached.latent_stats(cached.items[item.items[0]], item.flips[0])
    noise = torch.randn(stats["mean"].shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a[0], (stats["mean"] + stats["std"] * noise) * 0.18215, atol=1e-5)


def test_random_flip_caches_both_and_uses_the_flipped_latent(sd1, tmp_path):
    make_images(tmp_path / "inst", sizes=[(64, 64)] * 4)
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks")
    data = prepare(sd1, [concept], settings(random_flip=True), tmp_path / "cache", text_encoder_trained=True)
    assert data.report.cache["latents"]["misses"] == 8
    flips = [f for e in range(4) for p in data.epoch_plan(e) for f in p.flips]
    assert any(flips) and not all(flips)
    item = data.items[0]
    assert not torch.equal(data.latent_stats(item, False)["mean"], data.latent_stats(item, True)["mean"])


def test_text_cache_matches_direct_encoding_and_follows_the_weights(sd1, tmp_path):
    from comfyui_dreambooth.training.models.text import encode_prompts

    make_images(tmp_path / "inst", captions=["a dog on grass", "a dog in snow", "a dog", "x", "y"])
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks", class_token="dog")
    data = prepare(sd1, [concept], settings(), tmp_path / "cache")
    assert data.report.cache["text"]["misses"] == 5
    item = data.epoch_plan(0)[0]
    batch = data.load_batch(item)
    with torch.no_grad():
        direct = encode_prompts(sd1, batch.captions).embeds
    assert torch.allclose(batch.embeds, direct, atol=1e-6)
    assert prepare(sd1, [concept], settings(), tmp_path / "cache").report.cache["text"]["hits"] == 5
    # a trained (changed) text encoder must not reuse the base model's embeddings
    te = copy.deepcopy(sd1.text_encoders[0])
    with torch.no_grad():
        next(te.parameters()).add_(0.01)
    trained = sd1.replace(text_encoders=[te])
    assert prepare(trained, [concept], settings(), tmp_path / "cache").report.cache["text"]["hits"] == 0
    # clip skip is part of the key
    assert prepare(sd1, [concept], settings(), tmp_path / "cache", clip_skip=2).report.cache["text"]["hits"] == 0
    # text encoder trained: no text cache, embeds None, captions still given
    te_trained = prepare(sd1, [concept], settings(), tmp_path / "cache", text_encoder_trained=True)
    b = te_trained.load_batch(te_trained.epoch_plan(0)[0])
    assert b.embeds is None and b.pooled is None and b.captions


def test_shuffle_dropout_are_deterministic_per_epoch_position(sd1, tmp_path):
    make_images(tmp_path / "inst", sizes=[(64, 64)] * 4,
                captions=["sks dog, red, blue, green, yellow, pink"] * 4)
    # same caption text in every file but distinct pixels: four items
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks", class_token="dog",
                              repeats=4)
    data = prepare(sd1, [concept], settings(shuffle_tags=True, keep_tokens=1, caption_dropout=0.25),
                   tmp_path / "cache", batch_size=4)
    caps = [c for p in data.epoch_plan(0) for c in data.load_batch(p).captions]
    again = [c for p in data.epoch_plan(0) for c in data.load_batch(p).captions]
    assert caps == again
    assert "" in caps and len(set(caps)) > 3
    assert all(c == "" or c.startswith("sks dog, ") for c in caps)


def test_long_captions_warn_and_chunked_batches_share_a_length(sd1, tmp_path):
    long = "a dog, " + ", ".join(f"detail{i}" for i in range(60))
    make_images(tmp_path / "inst", sizes=[(64, 64)] * 2, captions=[long, "a dog"])
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks", class_token="dog")
    data = prepare(sd1, [concept], settings(long_captions="chunk"), tmp_path / "cache", batch_size=2)
    warning = [w for w in data.report.warnings if "token limit" in w]
    assert warning and "000-a dog.png" in warning[0]
    assert data.report.concepts[0].long_captions[0][1] > 75
    batch = data.load_batch(data.epoch_plan(0)[0])
    assert batch.embeds.shape[0] == 2 and batch.embeds.shape[1] > 77 and batch.embeds.shape[1] % 77 == 0
    truncated = prepare(sd1, [concept], settings(), tmp_path / "cache", batch_size=2)
    assert truncated.load_batch(truncated.epoch_plan(0)[0]).embeds.shape[1] == 77


def test_sdxl_time_ids_and_pooled(sdxl, tmp_path):
    make_images(tmp_path / "inst", sizes=[(150, 100), (150, 100)])
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks")
    data = prepare(sdxl, [concept], settings(random_flip=True), tmp_path / "cache", batch_size=2)
    item = data.epoch_plan(0)[0]
    batch = data.load_batch(item)
    assert batch.pooled.shape == (2, 32) and batch.embeds.shape == (2, 77, 64)
    assert batch.time_ids.shape == (2, 6)
    p = data.items[item.items[0]].placement
    top, left = p.crop_top_left(item.flips[0])
    assert batch.time_ids[0].tolist() == [100, 150, top, left, p.target[1], p.target[0]]
    assert batch.latents.shape[1] == 4


def test_bad_images_skip_or_stop_and_empty_folders(sd1, tmp_path):
    make_images(tmp_path / "inst", sizes=[(64, 64)] * 2)
    (tmp_path / "inst" / "zz.png").write_text("text with an image name")
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks")
    data = prepare(sd1, [concept], settings(), tmp_path / "cache")
    assert [os.path.basename(p) for p, _ in data.report.concepts[0].bad_files] == ["zz.png"]
    assert "zz.png" in data.report_text()
    with pytest.raises(DatasetError, match="zz.png") as e:
        prepare(sd1, [concept], settings(on_bad_image="stop"), tmp_path / "cache")
    assert "on_bad_image='skip'" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable images"):
        prepare(sd1, [ConceptSettings(instance_dir=str(tmp_path / "empty"), instance_token="sks")], settings(),
                tmp_path / "cache")
    with pytest.raises(DatasetError) as e:
        prepare(sd1, [ConceptSettings(instance_dir="", repeats=0)], settings(resolution=100), tmp_path / "cache")
    assert "instance_dir" in str(e.value) and "repeats" in str(e.value) and "resolution" in str(e.value)


def test_divisibility_check_suggests_a_fix(sd1, tmp_path):
    make_images(tmp_path / "inst")   # 5 images
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks")
    data = prepare(sd1, [concept], settings(), tmp_path / "cache", batch_size=2, text_encoder_trained=True)
    r = data.report
    assert r.examples_per_epoch == 5 and r.divisible is False
    assert "repeats 2" in r.divisibility and "1 more image" in r.divisibility
    assert "NOTE:" in data.report_text()
    ok = prepare(sd1, [concept.replace(repeats=2)], settings(), tmp_path / "cache", batch_size=2,
                 text_encoder_trained=True)
    assert ok.report.divisible is True
    ga = prepare(sd1, [concept.replace(repeats=2)], settings(), tmp_path / "cache", batch_size=2,
                 gradient_accumulation_steps=3, text_encoder_trained=True)
    assert ga.report.divisible is False and ga.report.optimizer_steps_per_epoch == -(-ga.batches_per_epoch // 3)
    assert r.to_dict()["divisibility"] == r.divisibility


def fake_generate(calls):
    def generate(model, prompts, *, width, height, seed, **kw):
        calls.append((list(prompts), width, height, seed, kw))
        g = torch.Generator().manual_seed(seed)
        return torch.rand((len(prompts), height, width, 3), generator=g)
    return generate


def test_class_images_generated_in_batches_then_reused(sd1, tmp_path):
    make_images(tmp_path / "inst", sizes=SIZES[:3], captions=["a dog on grass"] * 3)
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks", class_token="dog",
                              class_dir=str(tmp_path / "class"), class_prompt="photo of [filewords]",
                              num_class_images_per_image=2, prior_loss_weight=0.5)
    calls = []
    data = prepare(sd1, [concept], wide(), tmp_path / "cache", generate_fn=fake_generate(calls),
                   class_batch_size=3)
    pngs = sorted((tmp_path / "class").glob("*.png"))
    assert len(pngs) == 6
    for png in pngs:
        assert (png.with_suffix(".txt")).read_text().strip() == "photo of a dog on grass"
    # batched: one call per batch of same-size prompts, at the instance images' buckets
    assert len(calls) == 3 and all(len(c[0]) == 2 for c in calls)     # one call per bucket here
    assert {(c[1], c[2]) for c in calls} == {(128, 128), (192, 64), (64, 192)}
    assert all("sks" not in p for c in calls for p in c[0])
    r = data.report.concepts[0]
    assert (r.class_required, r.class_present, r.class_missing, r.class_generated) == (6, 6, 0, 6)
    # the epoch balances instance and prior examples; priors carry prior_loss_weight
    assert r.prior_examples_per_epoch == 3 and data.examples_per_epoch == 6
    seen_prior = False
    for item in data.epoch_plan(0):
        batch = data.load_batch(item)
        for prior, w in zip(batch.is_prior.tolist(), batch.loss_weights.tolist()):
            assert w == (0.5 if prior else 1.0)
            seen_prior |= prior
        assert all("sks" not in c for c, p in zip(batch.captions, batch.is_prior.tolist()) if p)
    assert seen_prior
    # class images rotate over epochs: all 6 used within two epochs
    used = {i for e in (0, 1) for p in data.epoch_plan(e) for i in p.items if data.items[i].is_prior}
    assert len(used) == 6
    # second run: nothing generated; one deleted -> exactly one generated, at that image's size
    calls.clear()
    prepare(sd1, [concept], wide(), tmp_path / "cache", generate_fn=fake_generate(calls))
    assert calls == []
    size = Image.open(pngs[3]).size
    pngs[3].unlink()
    prepare(sd1, [concept], wide(), tmp_path / "cache", generate_fn=fake_generate(calls))
    assert len(calls) == 1 and len(calls[0][0]) == 1 and calls[0][1:3] == size
    assert len(list((tmp_path / "class").glob("*.png"))) == 6
    # another prior method: class images neither generated nor used
    pngs[0].unlink()
    calls.clear()
    no_prior = prepare(sd1, [concept], wide(), tmp_path / "cache", generate_fn=fake_generate(calls),
                       use_class_images=False)
    assert calls == [] and not any(i.is_prior for i in no_prior.items)
    # present ones only: the shortfall is reported, not generated
    present = prepare(sd1, [concept], wide(), tmp_path / "cache", generate_fn=fake_generate(calls),
                      generate_class_images=False)
    assert calls == [] and sum(i.is_prior for i in present.items) == 5
    assert present.report.concepts[0].class_missing == 1
    assert any("1 of 6 class images missing" in w for w in present.report.warnings)


def test_class_generation_with_the_real_sampler_and_stop(sd1, tmp_path):
    from comfyui_dreambooth.training.data.class_images import ensure_class_images

    make_images(tmp_path / "inst", sizes=[(64, 64)] * 2)
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks", class_token="dog",
                              class_dir=str(tmp_path / "class"), class_prompt="a dog",
                              num_class_images_per_image=2, class_steps=2)
    small = settings(resolution=64, bucket_max_side=128)
    progress = []
    paths = ensure_class_images(sd1, concept, small, batch_size=4, scheduler="euler",
                                progress=lambda d, t: progress.append((d, t)))
    assert len(paths) == 4 and progress[-1] == (4, 4)
    assert Image.open(paths[0]).size == (64, 64)
    assert "a dog" in Image.open(paths[0]).text["parameters"]
    assert ensure_class_images(sd1, concept, small, batch_size=4) == paths     # reused
    more = concept.replace(num_class_images_per_image=3)
    with pytest.raises(PreparationStopped):
        prepare(sd1, [more], small, tmp_path / "cache", should_stop=lambda: True)
    assert len(list((tmp_path / "class").glob("*.png"))) == 4


def test_multiple_concepts(sd1, tmp_path):
    make_images(tmp_path / "a", sizes=[(64, 64)] * 3, seed=1)
    make_images(tmp_path / "b", sizes=[(96, 64)] * 2, seed=2)
    ca = ConceptSettings(instance_dir=str(tmp_path / "a"), instance_token="sks", class_token="dog", repeats=2)
    cb = ConceptSettings(instance_dir=str(tmp_path / "b"), instance_token="ohwx", class_token="cat", repeats=3,
                         concept_type="object")
    data = prepare(sd1, [ca, cb], settings(), tmp_path / "cache", batch_size=3)
    assert [c.instance_examples_per_epoch for c in data.report.concepts] == [6, 6]
    assert data.examples_per_epoch == 12
    captions = {data.items[i].concept_index: data.items[i].caption for i in range(len(data.items))}
    assert captions == {0: "a sks dog", 1: "ohwx cat, a dog"}
    text = data.report_text()
    assert "Concept 1" in text and "Concept 2 (object)" in text


def test_prepared_under_inference_mode_batches_still_train(sd1, tmp_path):
    """ComfyUI runs nodes under torch.inference_mode(); batches must still be usable by autograd."""
    import json

    make_images(tmp_path / "inst", sizes=[(64, 64)] * 2)
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks")
    with torch.inference_mode():
        data = prepare(sd1, [concept], settings(cache_mode="memory"), tmp_path / "cache")
        batch_inside = data.load_batch(data.epoch_plan(0)[0])
    batch = data.load_batch(data.epoch_plan(0)[0])
    w = torch.ones((), requires_grad=True)
    for b in (batch, batch_inside):
        assert not b.latents.is_inference() and not b.embeds.is_inference()
        (b.latents * w).sum().add((b.embeds * w).sum()).backward()
    json.dumps(data.report.to_dict())                 # the run folder stores it as JSON


def test_fp16_vae_overflow_falls_back_to_a_float32_copy(sd1, tmp_path):
    """SD-XL's VAE gives inf/NaN in fp16; latents must come out finite and the model must stay untouched."""
    make_images(tmp_path / "inst", sizes=[(64, 64)])
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks")
    vae16 = copy.deepcopy(sd1.vae).to(torch.float16)
    calls = []
    original = type(vae16).encode

    def overflowing_encode(self, x, *a, **kw):
        out = original(self, x, *a, **kw)
        calls.append(x.dtype)
        if x.dtype == torch.float16:
            out.latent_dist.mean.fill_(float("inf"))
        return out

    vae16.encode = overflowing_encode.__get__(vae16)
    model = sd1.replace(vae=vae16)
    data = prepare(model, [concept], settings(), tmp_path / "cache", text_encoder_trained=True)
    stats = data.latent_stats(data.items[0], False)
    assert torch.isfinite(stats["mean"]).all() and torch.float32 in calls
    assert next(vae16.parameters()).dtype == torch.float16


def test_model_loaded_under_inference_mode_prepares(tmp_path):
    """ComfyUI's LoadBaseModel runs under inference_mode, so the weights are inference tensors (no version
    counter): fingerprinting them for the cache keys must still work, inside and outside inference mode."""
    from comfyui_dreambooth.training.models import build_tiny_model

    with torch.inference_mode():
        model = build_tiny_model("sd1")
        for m in model.modules():
            for p in m.parameters():
                p.data = p.data.clone()          # made inside inference mode: inference tensors
    assert next(model.unet.parameters()).is_inference()
    make_images(tmp_path / "inst", sizes=[(64, 64)] * 2)
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks")
    data = prepare(model, [concept], settings(), tmp_path / "cache")
    assert data.load_batch(data.epoch_plan(0)[0]).latents.shape[0] >= 1
    with torch.inference_mode():
        again = prepare(model, [concept], settings(), tmp_path / "cache")
    first, second = data.report.to_dict()["cache"]["latents"], again.report.to_dict()["cache"]["latents"]
    assert second["hits"] == first["misses"] > 0 and second["misses"] == 0      # same keys: the cache is reused


def test_problem_files_are_logged_one_line_each(sd1, tmp_path):
    """Issue 9: what was only in dataset_report.txt reaches `log` (the node's console / the CLI), a line per file,
    before the long work (caching) starts."""
    paths = make_images(tmp_path / "inst", sizes=[(64, 64)] * 2, captions=["a dog", "a dog, " + ", ".join(
        f"detail{i}" for i in range(60))])
    (tmp_path / "inst" / "dup.png").write_bytes(open(paths[0], "rb").read())
    (tmp_path / "inst" / "zz.png").write_text("text with an image name")
    (tmp_path / "inst" / "notes.md").write_text("x")
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks")
    said = []
    data = prepare(sd1, [concept], settings(), tmp_path / "cache", log=said.append)
    d = str(tmp_path / "inst")
    for kind, path in (("BAD", f"{d}/zz.png"), ("DUPLICATE", f"{d}/dup.png"), ("IGNORED", f"{d}/notes.md"),
                       ("LONG CAPTION", paths[1])):
        lines = [m for m in said if m.startswith("concept 1: ") and kind in m and path in m]
        assert len(lines) == 1, (kind, said)
        assert lines[0].split("concept 1: ", 1)[1] in data.report_text()          # the same line in the report
    assert "the rest is cut off" in [m for m in said if "LONG CAPTION" in m][0]   # truncate is the setting
    from comfyui_dreambooth.training.data.report import is_notice

    assert all(is_notice(m) for m in data.report.notices()) and data.report.notices()
    assert not any(is_notice(m) for m in ("scanning images", "concept 1: generating 4 class images in /x",
                                          "caching latents (disk)", "training 4 steps (2/epoch) in /r"))
    first_cache = next(i for i, m in enumerate(said) if m.startswith("caching"))
    assert max(i for i, m in enumerate(said) if m.startswith("concept 1: ")) < first_cache


def test_processes_share_class_image_generation_and_make_the_same_set(sd1, tmp_path):
    """Two processes (run one after the other here, with the plan made before either writes, as the barrier
    orders it) make disjoint halves of the batches; together the same files, seeds and pixels as one process."""
    import threading

    from comfyui_dreambooth.training.data.prepare import generate_missing_class_images

    make_images(tmp_path / "inst", sizes=SIZES[:3], captions=["a dog on grass"] * 3)

    def concept(folder):
        return ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks", class_token="dog",
                               class_dir=str(tmp_path / folder), class_prompt="photo of [filewords]",
                               num_class_images_per_image=2)
    one_calls = []
    generate_missing_class_images(sd1, [concept("one")], wide(), generate_fn=fake_generate(one_calls), batch_size=1)
    barrier = threading.Barrier(2)
    calls, generated, errors = {0: [], 1: []}, {}, []

    def process(rank):
        try:
            generated[rank] = generate_missing_class_images(
                sd1, [concept("two")], wide(), generate_fn=fake_generate(calls[rank]), batch_size=1,
                shard=(rank, 2), sync=barrier.wait)
        except Exception as e:        # surfaced below
            errors.append(e)
    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(calls[0]) == len(calls[1]) == 3                    # 6 batches of 1, alternating
    assert {c[3] for c in calls[0]}.isdisjoint({c[3] for c in calls[1]})
    assert sorted(c[3] for c in calls[0] + calls[1]) == sorted(c[3] for c in one_calls)   # same seeds
    assert generated == {0: [6], 1: [6]}                          # each counts the whole set after the last sync
    one = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    two = sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    assert one == two and len(one) == 6
    for name in one:
        a = np.asarray(Image.open(tmp_path / "one" / name))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "two" / name)))


def test_processes_share_the_disk_caches_each_entry_once(sd1, tmp_path, monkeypatch):
    """Two processes fill a disk cache in shares. The second here lists what is missing only after the first
    has had every chance to write (the worst order); the shares must still cover every latent and caption
    exactly once, because each process lists before any of them writes."""
    import threading
    import time

    make_images(tmp_path / "inst", captions=[f"a dog number {i}" for i in range(5)])
    concept = ConceptSettings(instance_dir=str(tmp_path / "inst"), instance_token="sks", class_token="dog")
    data_settings = settings(random_flip=True, cache_mode="disk")
    barrier = threading.Barrier(2, timeout=120)
    prepared, errors = {}, []
    from comfyui_dreambooth.training.data.dataset import TrainingData

    encoded = {"latents": {}, "text": {}}          # per process (thread name): how many entries it encoded
    for kind, name in (("latents", "encode_latent_stats"), ("text", "encode_text")):
        def counting(self, entries, _real=getattr(TrainingData, name), _kind=kind):
            who = threading.current_thread().name
            encoded[_kind][who] = encoded[_kind].get(who, 0) + len(entries)
            return _real(self, entries)
        monkeypatch.setattr(TrainingData, name, counting)

    def process(rank):
        try:
            prepared[rank] = prepare(sd1, [concept], data_settings, tmp_path / "cache", shard=(rank, 2),
                                     sync=barrier.wait)
        except Exception as e:        # surfaced below
            errors.append(e)
    first = threading.Thread(target=process, args=(0,), name="rank0")
    first.start()
    deadline = time.time() + 120
    while first.is_alive() and barrier.n_waiting == 0 and time.time() < deadline:   # done, or held at the sync
        time.sleep(0.01)
    second = threading.Thread(target=process, args=(1,), name="rank1")
    second.start()
    for t in (first, second):
        t.join(timeout=120)
    assert not errors, errors
    for kind, entries in (("latents", 10), ("text", 5)):          # 5 images x (plain, flipped); 5 captions
        counts = [encoded[kind].get(f"rank{r}", 0) for r in (0, 1)]
        assert sum(counts) == entries and min(counts) > 0, (kind, counts)
    again = prepare(sd1, [concept], data_settings, tmp_path / "cache")
    assert again.report.cache["latents"]["misses"] == 0 and again.report.cache["text"]["misses"] == 0
    assert set(prepared) == {0, 1}
