"""Scanning concept folders: which images are usable, their captions, duplicates, class images present.

A scan reads every image once (full decode, at reduced scale for JPEG) so broken files are known before
training starts. Results are memoised per (path, size, mtime), so the node's preview scan and the
trainer's scan of the same folder do the work once.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

from .buckets import target_size
from .captions import build_caption, read_file_words
from .images import BadImageError, ImageInfo, list_image_files, probe_image
from .masks import MaskScan, is_mask_label, scan_masks
from .settings import FILEWORDS, ConceptSettings, DataSettings

_probe_memo: dict[tuple, ImageInfo | BadImageError] = {}
_probe_lock = threading.Lock()
_PROBE_MEMO_MAX = 200_000


def probe_cached(path: str) -> ImageInfo:
    """`probe_image`, remembered while the file's size and modification time stay the same."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _probe_lock:
        hit = _probe_memo.get(key)
    if hit is None:
        try:
            hit = probe_image(path)
        except BadImageError as e:
            hit = e
        with _probe_lock:
            if len(_probe_memo) > _PROBE_MEMO_MAX:
                _probe_memo.clear()
            _probe_memo[key] = hit
    if isinstance(hit, BadImageError):
        raise hit
    return hit


@dataclass
class ScannedImage:
    info: ImageInfo
    caption: str                 # the caption before per-epoch shuffle / dropout
    caption_source: str          # "txt" | "caption" | "filename" | "prompt" (class prompt without [filewords])
    file_words: str = ""         # the text [filewords] stood for

    @property
    def path(self) -> str:
        return self.info.path


@dataclass
class FolderScan:
    """The usable images of one folder plus what was wrong with the rest."""

    folder: str
    images: list[ScannedImage] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)           # (path, reason)
    duplicates: list[list[str]] = field(default_factory=list)          # [kept, dropped...] per content hash
    ignored: list[str] = field(default_factory=list)                   # non-image files


def scan_folder(folder: str, caption_for, *, exclude_hashes: frozenset = frozenset()) -> FolderScan:
    """Probe every image file in `folder`; `caption_for(path) -> (caption, source, file_words)`.

    Exact duplicates (same bytes) are kept once, the first by file name; the others are reported.
    Images whose hash is in `exclude_hashes` are dropped as duplicates too (e.g. an instance image copied
    into the class folder).
    """
    scan = FolderScan(folder=folder)
    if not folder or not os.path.isdir(folder):
        return scan
    paths, scan.ignored = list_image_files(folder)
    paths = [p for p in paths if not is_mask_label(p)]      # `<name>-masklabel.png`: a mask (masks.py), not an image
    first_by_hash: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for path in paths:
        try:
            info = probe_cached(path)
        except BadImageError as e:
            scan.bad.append((path, e.reason))
            continue
        except OSError as e:   # vanished or unreadable between listing and probing
            scan.bad.append((path, f"cannot read: {e}"))
            continue
        h = info.content_hash
        if h in first_by_hash or h in exclude_hashes:
            groups.setdefault(h, [first_by_hash.get(h, "(an instance image)")]).append(path)
            continue
        first_by_hash[h] = path
        caption, source, words = caption_for(path)
        scan.images.append(ScannedImage(info=info, caption=caption, caption_source=source, file_words=words))
    scan.duplicates = list(groups.values())
    return scan


def instance_caption_fn(concept: ConceptSettings):
    def caption_for(path: str):
        words, source = read_file_words(path)
        caption = build_caption(concept.instance_prompt, words, instance_token=concept.instance_token,
                                class_token=concept.class_token, is_class=False)
        return caption, source, words
    return caption_for


def class_prompt_for(concept: ConceptSettings, file_words: str) -> str:
    """The prompt for class images made for an instance image whose [filewords] text is `file_words`."""
    prompt = concept.class_prompt.strip() or concept.class_token.strip()
    return build_caption(prompt, file_words, instance_token=concept.instance_token,
                         class_token=concept.class_token, is_class=True)


def class_caption_fn(concept: ConceptSettings):
    def caption_for(path: str):
        words, source = read_file_words(path)
        if source != "filename":
            # a class image's own caption file is its prompt (how ours are saved): use it as written
            return words, source, words
        source = source if FILEWORDS in concept.class_prompt else "prompt"
        return class_prompt_for(concept, words), source, words
    return caption_for


@dataclass
class ConceptScan:
    concept: ConceptSettings
    instance: FolderScan
    classes: FolderScan
    class_required: int = 0
    masks: MaskScan = field(default_factory=MaskScan)

    @property
    def class_present(self) -> int:
        return len(self.classes.images)

    @property
    def class_missing(self) -> int:
        return max(0, self.class_required - self.class_present)


def scan_concept(concept: ConceptSettings) -> ConceptScan:
    instance = scan_folder(concept.instance_dir, instance_caption_fn(concept))
    classes = FolderScan(folder=concept.class_dir)
    required = 0
    if concept.uses_prior_preservation:
        classes = scan_folder(concept.class_dir, class_caption_fn(concept),
                              exclude_hashes=frozenset(i.info.content_hash for i in instance.images))
        required = concept.num_class_images_per_image * len(instance.images)
    return ConceptScan(concept=concept, instance=instance, classes=classes, class_required=required,
                       masks=scan_masks(instance.images, concept.instance_dir, concept.mask_dir,
                                        probe=probe_cached))


def wanted_class_prompts(scan: ConceptScan, data: DataSettings) -> list[tuple[str, tuple[int, int]]]:
    """One (prompt, bucket) per class image the concept should have, in instance-image order: each
    instance image asks for `num_class_images_per_image` images of its class prompt at its own bucket,
    so class images land in the same buckets as the instance images they regularise."""
    wanted = []
    for img in scan.instance.images:
        prompt = class_prompt_for(scan.concept, img.file_words)
        bucket = target_size(img.info.width, img.info.height, data)
        wanted += [(prompt, bucket)] * scan.concept.num_class_images_per_image
    return wanted


def match_class_images(scan: ConceptScan, data: DataSettings):
    """Split the class-image need into (existing images to use, (prompt, bucket) pairs still to generate).

    Existing images are matched to wanted (prompt, bucket) slots first; unmatched existing images (e.g. a
    user-supplied folder without captions) fill the remaining slots in name order; only what is still
    missing after that is generated. At most `class_required` images are used.
    """
    wanted = wanted_class_prompts(scan, data)
    pool = list(scan.classes.images)
    by_key: dict[tuple, list[ScannedImage]] = {}
    for img in pool:
        by_key.setdefault((img.caption, target_size(img.info.width, img.info.height, data)), []).append(img)
    used: list[ScannedImage] = []
    unmatched_slots = []
    for slot in wanted:
        candidates = by_key.get(slot)
        if candidates:
            used.append(candidates.pop(0))
        else:
            unmatched_slots.append(slot)
    used_ids = {id(i) for i in used}
    leftovers = [i for i in pool if id(i) not in used_ids]
    fill = min(len(leftovers), len(unmatched_slots))
    used += leftovers[:fill]
    to_generate = unmatched_slots[fill:]
    return used, to_generate


__all__ = ["probe_cached", "ScannedImage", "FolderScan", "scan_folder", "ConceptScan", "scan_concept",
           "class_prompt_for", "wanted_class_prompts", "match_class_images"]
