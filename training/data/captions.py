"""Captions: [filewords], instance/class token handling, tag shuffling, caption dropout.

Token handling follows the behaviour of the A1111 sd_dreambooth_extension (so prompts written for it keep
working), with two deliberate fixes noted below. With `instance_token` "sks" and `class_token` "dog":

instance images (the caption must name the subject by its rare token)
  - "[filewords]" is replaced by the image's caption text (same-name .txt / .caption, else the file name
    without leading numbers, e.g. "003-a dog on grass.jpg" -> "a dog on grass").
  - the caption holds both tokens          -> unchanged                     ("a sks dog" stays)
  - it holds the class token only          -> the token goes before it      ("a dog on grass" -> "a sks dog on grass")
  - it holds the instance token only       -> unchanged
  - it holds neither                       -> prepended                     ("on grass" -> "sks dog, on grass";
                                                                              "sks, on grass" without a class token)
class (prior) images (the caption must never contain the instance token)
  - generated ones are captioned by the prompt they were made with (their .txt), used verbatim.
  - otherwise the class prompt with [filewords] filled; the instance token is replaced by the class token
    (or dropped where the class token is already there); the class token is prepended when absent.

Differences from the extension: the class word is kept beside the instance token ("a sks dog", the
DreamBooth paper's form, where the extension rewrote it to "a sks"), and the instance token is not
prepended a second time when the prompt already contains it.
"""
from __future__ import annotations

import os
import random
import re

from .images import CAPTION_EXTENSIONS
from .settings import FILEWORDS

_LEADING_NUMBERS = re.compile(r"^[-\d_\s]+")
_SPACES = re.compile(r"\s+")
_BRACKET_ESCAPE = re.compile(r"\\(?=[()\[\]{}])")


def caption_file_for(image_path: str) -> str | None:
    """The same-name caption file of an image (.txt first, then .caption), or None."""
    stem = os.path.splitext(image_path)[0]
    for ext in CAPTION_EXTENSIONS:
        if os.path.isfile(stem + ext):
            return stem + ext
    return None


def text_from_filename(image_path: str) -> str:
    """'003-a_dog on grass (2).jpg' -> 'a dog on grass (2)': leading numbers dropped, '_' read as a space."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    stem = stem.encode("utf-8", "surrogatepass").decode("utf-8", "replace")   # a non-UTF-8 name: U+FFFD, not a crash
    text = _LEADING_NUMBERS.sub("", stem).replace("_", " ")
    return _SPACES.sub(" ", text).strip()


def read_file_words(image_path: str) -> tuple[str, str]:
    """(caption text for [filewords], where it came from: 'txt' / 'caption' / 'filename')."""
    path = caption_file_for(image_path)
    if path is None:
        return text_from_filename(image_path), "filename"
    with open(path, encoding="utf-8", errors="replace") as f:
        # Captions are one line by convention; tools that write several lines mean one caption.
        text = " ".join(line.strip() for line in f.read().splitlines() if line.strip())
    return text, os.path.splitext(path)[1].lstrip(".")


def _word(token: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(token)}(?!\w)", flags=re.IGNORECASE)


def _tidy(text: str) -> str:
    # A1111 escapes literal brackets ("\\(" in a tag); any other backslash separates words rather than gluing
    # them ("0\\G" with an inserted token must keep it a word of its own)
    text = _SPACES.sub(" ", _BRACKET_ESCAPE.sub("", text).replace("\\", " "))
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",\s*,+", ",", text)
    return text.strip().strip(",").strip()


def build_caption(prompt: str, file_words: str, *, instance_token: str = "", class_token: str = "",
                  is_class: bool = False) -> str:
    """The training caption of one image (see the module docstring for the rules)."""
    text = (prompt or FILEWORDS).replace(FILEWORDS, file_words)
    inst, cls = instance_token.strip(), class_token.strip()
    if is_class:
        if inst and _word(inst).search(text):
            replacement = "" if (cls and _word(cls).search(text)) else cls
            text = _word(inst).sub(lambda _: replacement, text)     # literal: a token may hold "\\1"
        if cls and not _word(cls).search(text):
            text = f"{cls}, {text}"
    elif inst and not _word(inst).search(text):
        if cls and _word(cls).search(text):
            # only the first mention: "a dog with another dog" -> "a sks dog with another dog"
            text = _word(cls).sub(lambda m: f"{inst} {m.group(0)}", text, count=1)
        else:
            text = f"{inst} {cls}, {text}" if cls else f"{inst}, {text}"
    return _tidy(text)


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """Shuffle comma-separated tags, keeping the first `keep_tokens` tags in place."""
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def caption_variant(caption: str, *, shuffle: bool, keep_tokens: int, dropout: float, rng: random.Random) -> str:
    """The caption an example is trained with this time: dropped to "" with probability `dropout`
    (the model also learns the unconditional case, which classifier-free guidance relies on), else
    tag-shuffled when asked. `rng` is seeded by the caller from (seed, epoch, position)."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if shuffle:
        return shuffle_tags(caption, keep_tokens, rng)
    return caption


__all__ = ["caption_file_for", "text_from_filename", "read_file_words", "build_caption", "shuffle_tags",
           "caption_variant"]
