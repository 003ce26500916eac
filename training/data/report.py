"""The dataset report: what will be trained on, what was dropped and why, and whether the numbers add up.

Built twice: cheaply by the ConceptDataset node from a folder scan (no model, no batch size), and fully by
`prepare_training_data` (buckets under the run's data settings, class images after generation, steps per
epoch, the divisibility check, cache use). `to_dict()` is JSON-able (saved in the run folder);
`report_text()` is what the nodes show.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .settings import ConceptSettings

TOKEN_LIMIT = 75
# files that are not images are named up to this many per concept, then counted: a report lists what was found
# for training, not every file name of a folder (a data folder may hold anything)
MAX_NAMED_IGNORED = 20
# what DatasetReport.notices() lines say after "concept N: " (or "WARNING: " for the rest)
NOTICE_KINDS = ("BAD", "DUPLICATE", "IGNORED", "LONG CAPTION", "MASK")


def is_notice(line: str) -> bool:
    """Whether a log line is one of `DatasetReport.notices()` (a problem to show), not a stage of the work."""
    if line.startswith("WARNING: "):
        return True
    head, sep, rest = line.partition(": ")
    return bool(sep) and head.startswith("concept ") and rest.startswith(NOTICE_KINDS)


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


@dataclass
class ConceptReport:
    index: int
    instance_dir: str
    instance_images: int = 0                 # usable, duplicates removed
    repeats: int = 1
    instance_examples_per_epoch: int = 0     # instance_images x repeats
    captions_from: dict = field(default_factory=dict)    # {"txt": n, "caption": n, "filename": n}
    bad_files: list = field(default_factory=list)         # [[path, reason], ...]
    duplicates: list = field(default_factory=list)        # [[kept, dropped, ...], ...]
    ignored_files: list = field(default_factory=list)     # non-image files in the folder (the first MAX_NAMED_IGNORED)
    ignored_count: int = 0                                # all non-image files in the folder
    long_captions: list = field(default_factory=list)     # [[path, tokens], ...] over the 75-token limit
    long_captions_mode: str = ""                          # DataSettings.long_captions ("" in the node's preview)
    buckets: dict = field(default_factory=dict)           # {"512x512": n} instance images per bucket
    prior_preservation: bool = False
    class_dir: str = ""
    class_required: int = 0
    class_present: int = 0
    class_missing: int = 0
    class_generated: int = 0
    class_bad_files: list = field(default_factory=list)
    class_duplicates: list = field(default_factory=list)
    class_buckets: dict = field(default_factory=dict)
    prior_examples_per_epoch: int = 0
    prior_loss_weight: float = 1.0
    concept_type: str = "person"
    masks_from: dict = field(default_factory=dict)        # {"masklabel": n, "mask_dir": n, "alpha": n} masked images
    without_mask: list = field(default_factory=list)      # instance images without a mask (the first MAX_NAMED_IGNORED)
    without_mask_count: int = 0
    mask_problems: list = field(default_factory=list)     # [[mask path, reason]]: mask files not used (the first
    mask_problem_count: int = 0                           # MAX_NAMED_IGNORED of them), and how many in all
    masked_loss: bool | None = None                       # None: not known (the node's preview)

    def mask_lines(self) -> list[str]:
        """The masks line of the report (none when the concept has no masks and masked loss is not asked for)."""
        masked = sum(self.masks_from.values())
        if not masked and not self.masked_loss:
            return []
        srcs = ", ".join(f"{n} from {k}" for k, n in sorted(self.masks_from.items()) if n)
        line = f"  masks: {masked} of {self.instance_images} instance images" + (f" ({srcs})" if srcs else "")
        if self.without_mask_count:
            more = self.without_mask_count - len(self.without_mask)
            line += ("; without a mask (trained on the whole image): " + ", ".join(self.without_mask)
                     + (f" and {more} more" if more > 0 else ""))
        if self.masked_loss is False:
            line += " (masked_loss is off: not used)"
        return [line]

    def file_notices(self) -> list[str]:
        """One line per file the user should know about (not used, or not used as it is), each naming the file:
        broken images, exact duplicates, files that are not images, captions over the token limit."""
        lines = []
        for path, reason in self.bad_files:
            lines.append(f"BAD: {reason}" if reason.startswith(path) else f"BAD: {path}: {reason}")
        for path, reason in self.class_bad_files:
            lines.append(f"BAD class image: {reason}" if reason.startswith(path)
                         else f"BAD class image: {path}: {reason}")
        for label, groups in (("DUPLICATE", self.duplicates), ("DUPLICATE class image", self.class_duplicates)):
            for group in groups:
                lines += [f"{label}: {dropped} same as {group[0]} (used once)" for dropped in group[1:]]
        lines += [f"IGNORED: {path} (not an image)" for path in self.ignored_files]
        unnamed = self.ignored_count - len(self.ignored_files)
        if unnamed > 0:
            lines.append(f"IGNORED: {unnamed} more file(s) in {self.instance_dir} that are not images (not listed)")
        what = {"truncate": "the rest is cut off", "chunk": "encoded in 75-token chunks"}.get(
            self.long_captions_mode, "cut off unless long_captions='chunk'")
        lines += [f"LONG CAPTION: {path}: {n} tokens, over the {TOKEN_LIMIT}-token limit ({what})"
                  for path, n in self.long_captions]
        lines += [f"MASK: {path}: {reason}" for path, reason in self.mask_problems]
        if self.mask_problem_count > len(self.mask_problems):
            lines.append(f"MASK: {self.mask_problem_count - len(self.mask_problems)} more mask file(s) not used "
                         "(not listed)")
        return lines


@dataclass
class DatasetReport:
    concepts: list = field(default_factory=list)          # [ConceptReport]
    buckets: dict = field(default_factory=dict)           # {"512x512": {"instance": n, "prior": m, "batches": k}}
    examples_per_epoch: int = 0
    batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    batches_per_epoch: int | None = None
    optimizer_steps_per_epoch: int | None = None
    partial_batches_per_epoch: int | None = None
    divisible: bool | None = None
    divisibility: str = ""                                # the check, with a concrete suggestion when it fails
    cache: dict = field(default_factory=dict)             # {"latents": {...}, "text": {...}}
    warnings: list = field(default_factory=list)
    scan_only: bool = False                               # True for the node's preview (no data settings applied)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def bad_files(self) -> list:
        return [b for c in self.concepts for b in c.bad_files + c.class_bad_files]

    def notices(self, concepts: list[int] | None = None) -> list[str]:
        """What to print where the user looks (the console, the CLI): one line per problem file, prefixed with
        its concept, then the warnings those lines do not already say. `concepts`: only these concept indices
        (and only their warnings)."""
        chosen = [c for c in self.concepts if concepts is None or c.index in concepts]
        lines = [f"concept {c.index + 1}: {line}" for c in chosen for line in c.file_notices()]
        said = {w for c in self.concepts for w in _file_warnings(c)}
        prefixes = tuple(f"concept {c.index + 1}:" for c in chosen)
        lines += [f"WARNING: {w}" for w in self.warnings if w not in said
                  and (concepts is None or w.startswith(prefixes))]
        return lines

    def report_text(self) -> str:
        lines = []
        for c in self.concepts:
            lines.append(f"Concept {c.index + 1} ({c.concept_type}): {c.instance_dir}")
            srcs = ", ".join(f"{n} from {k}" for k, n in sorted(c.captions_from.items()) if n)
            lines.append(f"  instance images: {c.instance_images} x {c.repeats} repeats = "
                         f"{c.instance_examples_per_epoch} per epoch" + (f" (captions: {srcs})" if srcs else ""))
            if c.buckets:
                lines.append("  buckets: " + ", ".join(f"{k}: {n}" for k, n in sorted(c.buckets.items())))
            if c.prior_preservation:
                line = (f"  class images ({c.class_dir}): {c.class_present} present of {c.class_required} needed")
                if c.class_missing:
                    line += f", {c.class_missing} missing (generated when training starts)"
                if c.class_generated:
                    line += f", {c.class_generated} generated now"
                lines.append(line)
                if c.prior_examples_per_epoch:
                    lines.append(f"  prior examples per epoch: {c.prior_examples_per_epoch} "
                                 f"(prior_loss_weight {c.prior_loss_weight:g})")
            lines += c.mask_lines()
            lines += [f"  {line}" for line in c.file_notices()]
        if self.batch_size is not None:
            lines.append(f"Examples per epoch: {self.examples_per_epoch}; batch size {self.batch_size} x "
                         f"gradient accumulation {self.gradient_accumulation_steps}: {self.batches_per_epoch} "
                         f"batches = {self.optimizer_steps_per_epoch} optimizer steps per epoch")
            if self.buckets:
                lines.append("Buckets: " + ", ".join(
                    f"{k}: {v['instance']}+{v['prior']} prior" if v.get("prior") else f"{k}: {v['instance']}"
                    for k, v in sorted(self.buckets.items())))
        else:
            lines.append(f"Examples per epoch: {self.examples_per_epoch}")
        if self.divisibility:
            lines.append(("OK: " if self.divisible else "NOTE: ") + self.divisibility)
        if self.cache:
            parts = []
            for name, s in self.cache.items():
                if s:
                    parts.append(f"{name} {s.get('mode')}: {s.get('hits', 0)} reused, {s.get('misses', 0)} encoded"
                                 + (f", {s['recomputed']} corrupt entries recomputed" if s.get("recomputed") else ""))
            if parts:
                lines.append("Cache: " + "; ".join(parts))
        for w in self.warnings:
            lines.append(f"WARNING: {w}")
        return "\n".join(lines)


def divisibility_check(concepts: list[ConceptSettings], instance_counts: list[int], prior_counts: list[int],
                       batch_size: int, grad_accum: int) -> tuple[bool, str]:
    """The A1111 guide's check: examples per epoch (images x repeats, plus prior examples) should be a
    multiple of batch size x gradient accumulation, or the last optimizer step of every epoch sees fewer
    examples (and with gradient accumulation, a partial accumulation). Returns (ok, message)."""
    per_step = batch_size * grad_accum
    total = sum(n * c.repeats for n, c in zip(instance_counts, concepts)) + sum(prior_counts)
    if total == 0:
        return False, "no usable images"
    if total % per_step == 0:
        return True, (f"{total} examples per epoch is a multiple of batch size {batch_size} x gradient "
                      f"accumulation {grad_accum} = {per_step}")
    rest = total % per_step
    msg = (f"{total} examples per epoch is not a multiple of batch size {batch_size} x gradient accumulation "
           f"{grad_accum} = {per_step}: the last step of each epoch uses {rest} of {per_step}.")
    suggestions = []
    if len(concepts) == 1 and instance_counts[0]:
        c, n = concepts[0], instance_counts[0]
        factor = 2 if prior_counts and prior_counts[0] else 1   # prior examples match instance examples
        for r in range(c.repeats + 1, c.repeats + per_step + 1):
            if (n * r * factor) % per_step == 0:
                suggestions.append(f"repeats {r} (instead of {c.repeats})")
                break
        for extra in range(1, per_step + 1):
            if ((n + extra) * c.repeats * factor) % per_step == 0:
                suggestions.append(f"{extra} more image(s)")
                break
        for fewer in range(1, min(n, per_step + 1)):
            if ((n - fewer) * c.repeats * factor) % per_step == 0:
                suggestions.append(f"{fewer} image(s) fewer")
                break
    for b in range(batch_size - 1, 0, -1):
        if total % (b * grad_accum) == 0:
            suggestions.append(f"batch size {b}")
            break
    if grad_accum > 1:
        for g in range(grad_accum - 1, 0, -1):
            if total % (batch_size * g) == 0:
                suggestions.append(f"gradient accumulation {g}")
                break
    if suggestions:
        msg += " Suggestion: " + ", or ".join(suggestions) + "."
    return False, msg


__all__ = ["TOKEN_LIMIT", "NOTICE_KINDS", "is_notice", "bucket_name", "ConceptReport", "DatasetReport", "divisibility_check"]


def caption_token_count(caption: str) -> int:
    """CLIP tokens in `caption`, without the start/end tokens (all SD families share CLIP's BPE)."""
    from ..models.tokenizing import clip_tokenizer

    return len(clip_tokenizer()(caption, truncation=False, add_special_tokens=False)["input_ids"])


def concept_report(index: int, scan, *, data_settings=None, class_generated: int = 0,
                   used_class_images: int | None = None, masked_loss: bool | None = None) -> ConceptReport:
    """A ConceptReport from a `scan.ConceptScan`; buckets are filled when `data_settings` is given."""
    from .buckets import target_size

    c = scan.concept
    r = ConceptReport(index=index, instance_dir=c.instance_dir, repeats=c.repeats, concept_type=c.concept_type,
                      prior_preservation=c.uses_prior_preservation, class_dir=c.class_dir,
                      prior_loss_weight=c.prior_loss_weight)
    r.instance_images = len(scan.instance.images)
    r.instance_examples_per_epoch = r.instance_images * c.repeats
    for img in scan.instance.images:
        r.captions_from[img.caption_source] = r.captions_from.get(img.caption_source, 0) + 1
    r.bad_files = [[p, why] for p, why in scan.instance.bad]
    r.duplicates = [list(g) for g in scan.instance.duplicates]
    r.ignored_files = list(scan.instance.ignored[:MAX_NAMED_IGNORED])
    r.ignored_count = len(scan.instance.ignored)
    r.masked_loss = masked_loss
    masks = scan.masks
    for img in scan.instance.images:
        mask = masks.found.get(img.path)
        if mask is not None:
            r.masks_from[mask.source] = r.masks_from.get(mask.source, 0) + 1
        else:
            r.without_mask_count += 1
            if len(r.without_mask) < MAX_NAMED_IGNORED:
                r.without_mask.append(img.path)
    r.mask_problems = [list(p) for p in masks.problems[:MAX_NAMED_IGNORED]]
    r.mask_problem_count = len(masks.problems)
    for img in scan.instance.images:
        n = caption_token_count(img.caption)
        if n > TOKEN_LIMIT:
            r.long_captions.append([img.path, n])
    if data_settings is not None:
        r.long_captions_mode = data_settings.long_captions
        for img in scan.instance.images:
            key = bucket_name(target_size(img.info.width, img.info.height, data_settings))
            r.buckets[key] = r.buckets.get(key, 0) + 1
    if c.uses_prior_preservation:
        r.class_required = scan.class_required
        present = scan.class_present if used_class_images is None else used_class_images
        r.class_present = min(present, r.class_required)
        r.class_missing = max(0, r.class_required - present)
        r.class_generated = class_generated
        r.class_bad_files = [[p, why] for p, why in scan.classes.bad]
        r.class_duplicates = [list(g) for g in scan.classes.duplicates]
    return r


def scan_report(concepts: list[ConceptSettings], data_settings=None) -> DatasetReport:
    """The node's cheap preview: scan folders (no model, nothing encoded) and report what was found."""
    from .scan import scan_concept

    report = DatasetReport(scan_only=data_settings is None)
    for i, concept in enumerate(concepts):
        problems = concept.validate()
        if problems:
            report.warnings += [f"concept {i + 1}: {p}" for p in problems]
        scan = scan_concept(concept)
        cr = concept_report(i, scan, data_settings=data_settings)
        report.concepts.append(cr)
        report.examples_per_epoch += cr.instance_examples_per_epoch + (
            cr.instance_examples_per_epoch if concept.uses_prior_preservation else 0)
        report.warnings += concept_warnings(cr)
    return report


def concept_warnings(cr: ConceptReport) -> list[str]:
    """The warnings of one concept's report: no usable images, broken files, over-long captions."""
    w = []
    if cr.instance_images == 0:
        w.append(f"concept {cr.index + 1}: no usable images in {cr.instance_dir!r}")
    elif cr.masked_loss and not sum(cr.masks_from.values()):
        w.append(f"concept {cr.index + 1}: masked_loss is on but no instance image has a mask (<name>-masklabel.png "
                 "beside it, a same-name file in mask_dir, or an alpha channel); it trains on whole images")
    return w + _file_warnings(cr)


def _file_warnings(cr: ConceptReport) -> list[str]:
    """The summary warnings of what `ConceptReport.file_notices` lists file by file."""
    w = []
    name = f"concept {cr.index + 1}"
    if cr.bad_files:
        w.append(f"{name}: {len(cr.bad_files)} broken image(s) skipped (on_bad_image='stop' refuses to train)")
    if cr.long_captions:
        shown = ", ".join(f"{p} ({n} tokens)" for p, n in cr.long_captions[:5])
        more = f" and {len(cr.long_captions) - 5} more" if len(cr.long_captions) > 5 else ""
        w.append(f"{name}: caption(s) over the {TOKEN_LIMIT}-token limit: {shown}{more}; they are truncated "
                 "unless long_captions='chunk'")
    if cr.mask_problems:
        w.append(f"{name}: {cr.mask_problem_count} mask file(s) not used: " + ", ".join(
            p for p, _ in cr.mask_problems[:5]) + (" ..." if cr.mask_problem_count > 5 else ""))
    return w
