"""Masked loss (issue 20.3): masks from `<name>-masklabel.png`, a mask_dir or the alpha channel; placed like their
images (resize, crop, flip); cached with the latents; in the dataset report; the settings; and an all-ones mask
trains bit-identically to no mask."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_dreambooth.training.data.buckets import apply_placement, placement_for
from comfyui_dreambooth.training.data.images import load_image
from comfyui_dreambooth.training.data.masks import MaskFile, placed_mask, scan_masks
from comfyui_dreambooth.training.data.prepare import prepare_training_data
from comfyui_dreambooth.training.data.report import scan_report
from comfyui_dreambooth.training.data.scan import scan_concept
from comfyui_dreambooth.training.data.settings import ConceptSettings, DataSettings
from comfyui_dreambooth.training.settings import DreamBoothSettings
from comfyui_dreambooth.training.setup.masked_loss import per_sample_loss
from comfyui_dreambooth.training.setup.noise import per_sample_mse

pytestmark = pytest.mark.usefixtures("single_thread")


def rgb(path, size=(64, 64), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr, mode).save(path)
    return str(path)


def grey(path, size=(64, 64), value=None, seed=1):
    """A greyscale mask: constant `value`, or a random pattern."""
    if value is not None:
        arr = np.full((size[1], size[0]), value, dtype=np.uint8)
    else:
        arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(arr, "L").save(path)
    return str(path)


def concept(folder, **kw):
    return ConceptSettings(instance_dir=str(folder), instance_token="sks", class_token="dog", **kw)


def data_settings(**kw):
    return DataSettings(**{"resolution": 64, "bucket_min_side": 64, "bucket_max_side": 128, **kw})


# ---- reading masks ------------------------------------------------------------------------------------------
def test_masks_come_from_masklabel_mask_dir_and_alpha(tmp_path):
    inst, masks = tmp_path / "inst", tmp_path / "masks"
    inst.mkdir()
    masks.mkdir()
    rgb(inst / "a.png")
    grey(inst / "a-masklabel.png")                        # OneTrainer: beside the image
    rgb(inst / "b.png", seed=2)
    grey(masks / "b.png")                                 # kohya: same file name in mask_dir
    rgb(inst / "c.jpg", seed=3)
    grey(masks / "c.png")                                 # same name, another extension
    rgb(inst / "d.png", seed=4, mode="RGBA")              # alpha channel
    rgb(inst / "e.png", seed=5)                           # no mask
    scan = scan_concept(concept(inst, mask_dir=str(masks)))
    names = sorted(os.path.basename(i.path) for i in scan.instance.images)
    assert names == ["a.png", "b.png", "c.jpg", "d.png", "e.png"]     # the masklabel file is no training image
    assert scan.instance.ignored == []
    found = {os.path.basename(k): (os.path.basename(v.path), v.source) for k, v in scan.masks.found.items()}
    assert found == {"a.png": ("a-masklabel.png", "masklabel"), "b.png": ("b.png", "mask_dir"),
                     "c.jpg": ("c.png", "mask_dir"), "d.png": ("d.png", "alpha")}
    assert scan.masks.problems == []


def test_a_mask_file_wins_over_the_alpha_channel_and_masklabel_over_mask_dir(tmp_path):
    inst, masks = tmp_path / "inst", tmp_path / "masks"
    inst.mkdir()
    masks.mkdir()
    rgb(inst / "a.png", mode="RGBA")
    grey(masks / "a.png")
    rgb(inst / "b.png", mode="RGBA", seed=2)
    grey(masks / "b.png")
    grey(inst / "b-masklabel.png")
    found = scan_concept(concept(inst, mask_dir=str(masks))).masks.found
    assert {os.path.basename(k): v.source for k, v in found.items()} == {"a.png": "mask_dir", "b.png": "masklabel"}


def test_loaded_masks_read_the_file_in_grey_and_the_alpha_channel(tmp_path):
    rgb(tmp_path / "a.png", mode="RGBA", seed=7)
    grey(tmp_path / "m.png", seed=8)
    alpha = np.asarray(Image.open(tmp_path / "a.png"))[..., 3]
    mask_file = np.asarray(Image.open(tmp_path / "m.png"))
    placement = placement_for(64, 64, data_settings())
    from_alpha = placed_mask(MaskFile(str(tmp_path / "a.png"), "alpha", "x"), placement, False, 1)
    from_file = placed_mask(MaskFile(str(tmp_path / "m.png"), "mask_dir", "y"), placement, False, 1)
    assert torch.equal(from_alpha[0], torch.from_numpy(alpha.astype(np.float32) / 255))
    assert torch.equal(from_file[0], torch.from_numpy(mask_file.astype(np.float32) / 255))


@pytest.mark.parametrize("size, flipped, bucketing", [((100, 64), True, True), ((64, 150), False, True),
                                                      ((90, 70), True, False)])
def test_masks_are_resized_cropped_and_flipped_exactly_like_their_images(tmp_path, size, flipped, bucketing):
    """A grey image used as its own mask: the placed mask is the placed image, pixel for pixel."""
    path = grey(tmp_path / "g.png", size=size, seed=3)
    data = data_settings(bucketing=bucketing, center_crop=True)
    placement = placement_for(size[0], size[1], data)
    assert placement.original != placement.target                        # the cases really resize / crop
    image = apply_placement(load_image(path), placement)
    if flipped:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32)[..., 0] / 255)
    mask = placed_mask(MaskFile(path, "mask_dir", "h"), placement, flipped, 1)
    assert torch.equal(mask[0], expected)
    # at latent size: the area average of 8x8 pixel blocks
    small = placed_mask(MaskFile(path, "mask_dir", "h"), placement, flipped, 8)
    assert small.shape == (1, placement.target[1] // 8, placement.target[0] // 8)
    assert torch.allclose(small[0], expected.reshape(small.shape[1], 8, small.shape[2], 8).mean(dim=(1, 3)))


# ---- the report ---------------------------------------------------------------------------------------------
def test_report_counts_images_with_and_without_masks_and_names_unusable_masks(tmp_path):
    inst, masks = tmp_path / "inst", tmp_path / "masks"
    inst.mkdir()
    masks.mkdir()
    rgb(inst / "a.png")
    grey(inst / "a-masklabel.png")
    rgb(inst / "b.png", seed=2)
    grey(masks / "b.png", size=(32, 32))                   # another size than its image: not used
    rgb(inst / "c.png", seed=3)
    grey(inst / "gone-masklabel.png")                      # its image is missing
    grey(masks / "nobody.png")                             # no image of that name
    report = scan_report([concept(inst, mask_dir=str(masks))])
    cr = report.concepts[0]
    assert cr.instance_images == 3 and cr.masks_from == {"masklabel": 1}
    assert sorted(os.path.basename(p) for p in cr.without_mask) == ["b.png", "c.png"]
    problems = {os.path.basename(p): why for p, why in cr.mask_problems}
    assert set(problems) == {"b.png", "gone-masklabel.png", "nobody.png"}
    assert "32x32" in problems["b.png"] and "64x64" in problems["b.png"]
    text = report.report_text()
    assert "masks: 1 of 3 instance images (1 from masklabel)" in text
    assert "without a mask" in text and str(inst / "c.png") in text
    for name in ("b.png", "gone-masklabel.png", "nobody.png"):
        assert any(line.startswith("concept 1: MASK: ") and name in line for line in report.notices()), name


def test_report_is_silent_about_masks_when_there_are_none(tmp_path):
    rgb(tmp_path / "a.png")
    text = scan_report([concept(tmp_path)]).report_text()
    assert "mask" not in text.lower()


# ---- settings -----------------------------------------------------------------------------------------------
def test_settings_validation_lists_every_mask_problem():
    assert DreamBoothSettings().masked_loss is False and DreamBoothSettings().unmasked_weight == 0.1
    assert DreamBoothSettings().normalize_masked_area is True
    problems = DreamBoothSettings(unmasked_weight=0.5, normalize_masked_area=False).validate(check_environment=False)
    assert len(problems) == 2 and all("masked_loss = False" in p for p in problems)
    problems = DreamBoothSettings(masked_loss=True, unmasked_weight=1.5).validate(check_environment=False)
    assert problems == ["unmasked_weight = 1.5 is out of range; use 0 to 1"]
    assert DreamBoothSettings(masked_loss=True, unmasked_weight=0.0).validate(check_environment=False) == []
    imagic = DreamBoothSettings(masked_loss=True, train_imagic_only=True).validate(check_environment=False)
    assert any("masked_loss = True with train_imagic_only" in p for p in imagic)


def test_mask_settings_at_their_defaults_keep_run_identities():
    """Runs made before masked loss existed keep their config hash and concept identity."""
    assert not {"masked_loss", "unmasked_weight", "normalize_masked_area"} & set(DreamBoothSettings().result_dict())
    assert DreamBoothSettings(masked_loss=True).config_hash() != DreamBoothSettings().config_hash()
    assert "mask_dir" not in ConceptSettings().to_dict()
    c = ConceptSettings(mask_dir="/somewhere")
    assert c.to_dict()["mask_dir"] == "/somewhere" and ConceptSettings.from_dict(c.to_dict()) == c


def test_mask_dir_is_checked(tmp_path):
    problems = concept(tmp_path, mask_dir=str(tmp_path / "missing")).validate()
    assert any(p.startswith("mask_dir = ") and "not an existing folder" in p for p in problems)
    assert any("mask_dir is the same folder as instance_dir" in p
               for p in concept(tmp_path, mask_dir=str(tmp_path)).validate())


# ---- the loss -----------------------------------------------------------------------------------------------
def test_masked_loss_weights_and_normalizes():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, :, :4] = 1.0                               # left half is the subject
    on = DreamBoothSettings(masked_loss=True, unmasked_weight=0.0)
    left = per_sample_mse(pred[..., :4], target[..., :4])
    assert torch.allclose(per_sample_loss(pred, target, masks, on), left)                     # normalized
    raw = per_sample_loss(pred, target, masks, on.replace(normalize_masked_area=False))
    assert torch.allclose(raw, left / 2)
    ones = torch.ones(2, 1, 8, 8)
    assert torch.equal(per_sample_loss(pred, target, ones, on), per_sample_mse(pred, target))
    assert torch.equal(per_sample_loss(pred, target, masks, DreamBoothSettings()), per_sample_mse(pred, target))
    some = per_sample_loss(pred, target, masks, on.replace(unmasked_weight=0.1, normalize_masked_area=False))
    d = (pred - target).pow(2)
    assert torch.allclose(some, (d[..., :4].sum(dim=(1, 2, 3)) + 0.1 * d[..., 4:].sum(dim=(1, 2, 3))) / 256)


# ---- through the prepared data --------------------------------------------------------------------------------
def prepare(model, concepts, cache_dir, data=None, **kw):
    return prepare_training_data(model, concepts, data or data_settings(), cache_dir=str(cache_dir),
                                 text_encoder_trained=False, batch_size=1, seed=0, **kw)


def test_batches_carry_placed_flipped_masks_cached_with_the_latents(sd1, tmp_path):
    inst = tmp_path / "inst"
    inst.mkdir()
    rgb(inst / "a.png", size=(100, 64))
    mask_path = grey(inst / "a-masklabel.png", size=(100, 64), seed=4)
    data = prepare(sd1, [concept(inst)], tmp_path / "cache", data_settings(random_flip=True), masks=True)
    item = data.items[0]
    assert item.mask is not None and item.mask.source == "masklabel"
    assert "masks: 1 of 1 instance images (1 from masklabel)" in data.report_text()
    for flipped in (False, True):
        plan = [p for e in range(8) for p in data.epoch_plan(e) if p.flips[0] == flipped][0]
        batch = data.load_batch(plan)
        expected = placed_mask(item.mask, item.placement, flipped, sd1.vae_scale_factor)
        assert batch.masks.shape == (1, 1, *batch.latents.shape[2:])
        assert torch.equal(batch.masks[0], expected)
    # cached beside the latents: 2 latents + 2 masks (one per flip) on disk
    cached = [f for _, _, files in os.walk(tmp_path / "cache" / "latents") for f in files]
    assert len(cached) == 4
    # a changed mask gets a new cache key: the batch follows the new file
    grey(mask_path, size=(100, 64), value=255)
    os.utime(mask_path, ns=(1, 1))
    data2 = prepare(sd1, [concept(inst)], tmp_path / "cache", data_settings(random_flip=True), masks=True)
    assert data2.items[0].mask.content_hash != item.mask.content_hash
    plan = data2.epoch_plan(0)[0]
    assert torch.equal(data2.load_batch(plan).masks, torch.ones(1, 1, *data2.load_batch(plan).latents.shape[2:]))
    assert data2.latent_cache.stats()["misses"] == 2          # the two new mask entries; the latents are reused
    # masked_loss off: no masks in the items or batches, and the report says they are not used
    off = prepare(sd1, [concept(inst)], tmp_path / "cache", data_settings(random_flip=True))
    assert off.items[0].mask is None and off.load_batch(off.epoch_plan(0)[0]).masks is None
    assert "(masked_loss is off: not used)" in off.report_text()


def test_class_images_are_never_masked(sd1, tmp_path):
    inst, cls = tmp_path / "inst", tmp_path / "cls"
    inst.mkdir()
    cls.mkdir()
    rgb(inst / "a.png", mode="RGBA")
    rgb(cls / "c.png", mode="RGBA", seed=9)
    grey(cls / "c-masklabel.png")
    c = concept(inst, class_dir=str(cls), class_prompt="a dog", num_class_images_per_image=1)
    data = prepare(sd1, [c], tmp_path / "cache", masks=True, generate_class_images=False)
    prior = [i for i in data.items if i.is_prior]
    assert len(prior) == 1 and prior[0].mask is None
    assert [i.mask.source for i in data.items if not i.is_prior] == ["alpha"]
    for plan in data.epoch_plan(0):
        batch = data.load_batch(plan)
        if bool(batch.is_prior[0]):
            assert batch.masks is None


def test_masked_loss_without_any_mask_warns(sd1, tmp_path):
    rgb(tmp_path / "a.png")
    data = prepare(sd1, [concept(tmp_path)], tmp_path / "cache", data_settings(cache_mode="memory"), masks=True)
    assert any("masked_loss is on but no instance image has a mask" in w for w in data.report.warnings)


# ---- training -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_all_ones_masks_train_bit_identically_to_no_masks(sd1, tmp_path):
    from trainer_fixtures import make_concept, module_hash, read_losses, tiny_settings

    from comfyui_dreambooth.training.trainer import train

    c = make_concept(tmp_path, n=2)
    settings = tiny_settings(steps_per_image=0, max_train_steps=3, data={"random_flip": True})

    def run(name, **changes):
        result = train(sd1, [c], settings.replace(**changes), output_root=str(tmp_path / name))
        return module_hash(result.model.unet), [r["loss"] for r in read_losses(result.run_dir)], result

    plain_hash, plain_losses, _ = run("plain")
    for path in sorted(os.listdir(c.instance_dir)):
        grey(os.path.join(c.instance_dir, path[:-4] + "-masklabel.png"), value=255)
    ones_hash, ones_losses, ones = run("ones", masked_loss=True)
    assert "masks: 2 of 2 instance images" in ones.report
    assert ones_losses == plain_losses and ones_hash == plain_hash
    # and the masks do reach the loss: a half mask trains differently
    for path in sorted(os.listdir(c.instance_dir)):
        if path.endswith("-masklabel.png"):
            arr = np.full((64, 64), 255, dtype=np.uint8)
            arr[:, 32:] = 0
            Image.fromarray(arr, "L").save(os.path.join(c.instance_dir, path))
    half_hash, half_losses, _ = run("half", masked_loss=True)
    assert half_losses != plain_losses and half_hash != plain_hash


def test_report_names_at_most_a_few_unusable_masks(tmp_path):
    """A mask_dir pointed at a big folder: the first MAX_NAMED_IGNORED are named, the rest counted."""
    from comfyui_dreambooth.training.data.report import MAX_NAMED_IGNORED

    inst, masks = tmp_path / "inst", tmp_path / "masks"
    inst.mkdir()
    masks.mkdir()
    rgb(inst / "a.png")
    for i in range(MAX_NAMED_IGNORED + 5):
        grey(masks / f"other{i:02d}.png", size=(8, 8))
    report = scan_report([concept(inst, mask_dir=str(masks))])
    lines = [line for line in report.notices() if "MASK:" in line]
    assert len(lines) == MAX_NAMED_IGNORED + 1 and lines[-1].endswith("MASK: 5 more mask file(s) not used (not listed)")


def test_toy_world_subjects_come_with_exact_masks(tmp_path):
    """training/toyworld/masked.py: draw_subject's own images, with masks the data scan reads (OneTrainer layout)."""
    from comfyui_dreambooth.training.toyworld import world
    from comfyui_dreambooth.training.toyworld.masked import draw_subject_with_masks, write_masked_subject

    subject = world.SUBJECTS["dotted_heart"]
    plain = world.draw_subject(subject, 3, seed=3, backgrounds=["white"])
    masked = draw_subject_with_masks(subject, 3, seed=3, backgrounds=["white"])
    for image, (same, mask) in zip(plain, masked):
        assert image.tobytes() == same.tobytes() and mask.mode == "L" and mask.size == image.size
        background = (np.asarray(image).astype(int) == np.array(world.BACKGROUNDS["white"])).all(axis=-1)
        m = np.asarray(mask)
        assert (m[background] == 0).all() and (m[~background] > 0).all() and (m == 255).any()
    paths = write_masked_subject(str(tmp_path / "inst"), subject, 2, seed=3, backgrounds=["white"])
    scan = scan_concept(concept(tmp_path / "inst"))
    assert sorted(i.path for i in scan.instance.images) == sorted(paths)
    assert {v.source for v in scan.masks.found.values()} == {"masklabel"} and len(scan.masks.found) == 2
