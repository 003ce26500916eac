"""Captions: [filewords] sources, instance/class token rules, tag shuffle, dropout, determinism."""
import random

import pytest

from comfyui_dreambooth.training.data.captions import (build_caption, caption_variant, read_file_words,
                                                        shuffle_tags, text_from_filename)


def test_filewords_sources_txt_then_caption_then_filename(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("a dog on grass\n")
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "b.caption").write_text("a dog\nin snow\n")
    (tmp_path / "003-my_dog at home.jpg").write_bytes(b"")
    assert read_file_words(str(tmp_path / "a.png")) == ("a dog on grass", "txt")
    assert read_file_words(str(tmp_path / "b.png")) == ("a dog in snow", "caption")
    assert read_file_words(str(tmp_path / "003-my_dog at home.jpg")) == ("my dog at home", "filename")
    assert text_from_filename("/x/IMG_0001.jpg") == "IMG 0001"


@pytest.mark.parametrize("prompt,words,expected", [
    ("[filewords]", "a dog on grass", "a sks dog on grass"),             # class word present: token before it
    ("[filewords]", "a sks dog on grass", "a sks dog on grass"),         # both present: unchanged
    ("[filewords]", "sks on grass", "sks on grass"),                     # instance only: unchanged
    ("[filewords]", "on grass", "sks dog, on grass"),                    # neither: prepended
    ("photo of [filewords]", "a Dog, running", "photo of a sks Dog, running"),   # case-insensitive match
    ("a dog and another dog", "", "a sks dog and another dog"),          # first mention only
    ("a dogma", "", "sks dog, a dogma"),                                 # whole words only
    ("photo of sks dog", "ignored", "photo of sks dog"),                 # no [filewords]: prompt as is
])
def test_instance_captions(prompt, words, expected):
    assert build_caption(prompt, words, instance_token="sks", class_token="dog") == expected


def test_instance_caption_without_class_token():
    assert build_caption("[filewords]", "on grass", instance_token="sks") == "sks, on grass"
    assert build_caption("[filewords]", "sks on grass", instance_token="sks") == "sks on grass"
    assert build_caption("[filewords]", "on grass") == "on grass"


@pytest.mark.parametrize("prompt,words,expected", [
    ("[filewords]", "a sks dog on grass", "a dog on grass"),           # instance dropped next to the class word
    ("[filewords]", "sks on grass", "dog on grass"),                   # instance replaced by the class word
    ("[filewords]", "on grass", "dog, on grass"),                      # class word prepended
    ("photo of a dog", "x", "photo of a dog"),
])
def test_class_captions_never_hold_the_instance_token(prompt, words, expected):
    out = build_caption(prompt, words, instance_token="sks", class_token="dog", is_class=True)
    assert out == expected and "sks" not in out


def test_whitespace_and_backslashes_are_tidied():
    assert build_caption("[filewords]", "  a \\(dog\\)   on  grass , ", instance_token="", class_token="") == \
        "a (dog) on grass"


def test_shuffle_keeps_leading_tags_and_is_deterministic():
    cap = "sks dog, a, b, c, d, e, f"
    out1 = shuffle_tags(cap, 1, random.Random("s"))
    out2 = shuffle_tags(cap, 1, random.Random("s"))
    assert out1 == out2 and out1.startswith("sks dog, ")
    assert sorted(out1.split(", ")) == sorted(cap.split(", "))
    outs = {shuffle_tags(cap, 2, random.Random(i)) for i in range(20)}
    assert len(outs) > 1 and all(o.startswith("sks dog, a, ") for o in outs)


def test_caption_dropout_rate():
    n = sum(caption_variant("x", shuffle=False, keep_tokens=0, dropout=0.3, rng=random.Random(i)) == ""
            for i in range(2000))
    assert 500 < n < 700
    assert caption_variant("x, y", shuffle=False, keep_tokens=0, dropout=0.0, rng=random.Random(0)) == "x, y"
