"""Buckets: multiples of 64 within the pixel budget, deterministic assignment, crops and SDXL crop coords."""
import itertools
import random

from PIL import Image

from comfyui_dreambooth.training.data.buckets import (apply_placement, assign_bucket, make_buckets, place,
                                                       placement_for, target_size)
from comfyui_dreambooth.training.data.settings import DataSettings


def test_buckets_are_multiples_of_64_within_budget_and_limits():
    buckets = make_buckets(512, 256, 1024)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= 512 * 512
    assert buckets == sorted(set(buckets))
    assert all((h, w) in buckets for w, h in buckets)     # portrait and landscape alike


def test_assignment_picks_nearest_aspect_and_is_order_independent():
    buckets = make_buckets(512, 256, 1024)
    assert assign_bucket(1000, 1000, buckets) == (512, 512)
    assert assign_bucket(3000, 4000, buckets) in {(448, 576)}   # 3:4 portrait phone photo
    assert assign_bucket(4000, 3000, buckets) == (576, 448)
    assert assign_bucket(100, 10000, buckets) == (256, 1024)    # extreme: clamped to the narrowest
    shuffled = buckets[:]
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        for w, h in itertools.product([500, 640, 1920, 333], repeat=2):
            assert assign_bucket(w, h, shuffled) == assign_bucket(w, h, buckets)


def test_no_bucketing_means_one_square():
    s = DataSettings(resolution=256, bucketing=False)
    assert target_size(1920, 1080, s) == (256, 256)
    crop = placement_for(1920, 1080, s)
    assert crop.resized == (455, 256) and crop.crop_left == 99 and crop.crop_top == 0
    squash = placement_for(1920, 1080, s.replace(center_crop=False))
    assert squash.resized == (256, 256) and (squash.crop_left, squash.crop_top) == (0, 0)


def test_placement_crop_and_flip_coordinates():
    p = place(300, 200, (128, 128))
    assert p.resized == (192, 128) and p.crop_left == 32 and p.crop_top == 0
    assert p.crop_top_left() == (0, 32)
    assert p.crop_top_left(flipped=True) == (0, 192 - 32 - 128)
    im = Image.new("RGB", (300, 200), (255, 0, 0))
    out = apply_placement(im, p)
    assert out.size == (128, 128)
    small = place(40, 30, (64, 64))                 # upscaled to cover the bucket
    assert small.resized[0] >= 64 and small.resized[1] == 64
    assert apply_placement(Image.new("RGB", (40, 30)), small).size == (64, 64)
