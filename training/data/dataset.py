"""Prepared training data: the examples (`Item`), the plan of every epoch (`PlanItem`, a function of (seed, epoch))
and the batches it loads (`Batch`), with the latent / text caches behind them. `TrainingData` is built by
prepare.prepare_training_data, which does the checking, scanning and encoding first.

One epoch = every instance image `repeats` times, plus as many prior (class) examples as the concept has
instance examples (the DreamBooth 1:1 balance), the class images rotating over epochs so all of them are
used. `batch_size` counts all examples; a batch holds one bucket only and may mix instance and prior
examples (`Batch.is_prior`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

from .buckets import Placement
from .cache import TensorCache, make_key, module_fingerprint
from .captions import caption_variant
from .images import load_image
from .masks import MaskFile, batch_masks, fill_mask_cache
from .report import TOKEN_LIMIT, DatasetReport, bucket_name, divisibility_check
from .settings import ConceptSettings, DataSettings, parse_color

VAE_BATCH = 4          # images per VAE call while filling the latent cache
TEXT_BATCH = 16        # captions per text-encoder call while filling the text cache


class DatasetError(ValueError):
    """The data cannot be trained on; the message lists every problem with its file or setting."""


class PreparationStopped(RuntimeError):
    """`should_stop()` turned true while preparing (generating class images or encoding)."""


@dataclass(frozen=True)
class Item:
    """One usable image of the dataset."""

    path: str
    content_hash: str
    concept_index: int
    is_prior: bool
    caption: str                       # before shuffle / dropout
    placement: Placement
    has_alpha: bool = False
    mask: MaskFile | None = None       # masked loss: the subject's mask (instance images only; masks.py)

    @property
    def bucket(self) -> tuple[int, int]:
        return self.placement.target


@dataclass(frozen=True)
class PlanItem:
    """One batch of an epoch: a pure description (indices into `TrainingData.items`), cheap to store."""

    epoch: int
    position: int                      # index of this batch within the epoch
    bucket: tuple[int, int]            # (width, height) of every image in the batch
    items: tuple[int, ...]
    flips: tuple[bool, ...]


@dataclass
class Batch:
    latents: object                    # (B, C, h, w) on device, dtype; already x VAE scaling factor
    captions: list[str]                # after token handling, tag shuffle and caption dropout
    embeds: object                     # (B, 77*k, D) cached text embeddings, or None when the text encoder trains
    pooled: object                     # (B, P) SDXL pooled embeddings, else None
    is_prior: object                   # bool tensor (B,)
    loss_weights: object               # float tensor (B,): 1 for instance examples, prior_loss_weight for prior
    time_ids: object                   # SDXL (B, 6) size conditioning, else None
    paths: list[str]
    concept_indices: list[int] = field(default_factory=list)
    flips: list[bool] = field(default_factory=list)
    masks: object = None               # (B, 1, h, w) float32 loss masks when an example has one (masks.py), else None


def _rng(*parts) -> random.Random:
    """A Random seeded by a string of `parts`: stable across processes and Python versions."""
    return random.Random(":".join(str(p) for p in parts))


class TrainingData:
    """Prepared data: items, the per-epoch plan, caches, and the report. Built by `prepare_training_data`."""

    def __init__(self, model, concepts: list[ConceptSettings], data_settings: DataSettings, items: list[Item], *,
                 batch_size: int, seed: int, text_encoder_trained: bool, clip_skip: int | None,
                 latent_cache: TensorCache | None, text_cache: TensorCache | None, report: DatasetReport):
        self.model = model
        self.concepts = concepts
        self.settings = data_settings
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.text_encoder_trained = text_encoder_trained
        self.clip_skip = clip_skip
        self.latent_cache = latent_cache
        self.text_cache = text_cache
        self.report = report
        self.background = parse_color(data_settings.background_color)
        self._vae_id: str | None = None
        self._vae_fp32 = None            # made only if the fp16 VAE overflows
        self._text_id: str | None = None
        self._layout = self._epoch_layout()
        self.batches_per_epoch = sum(math.ceil(n / batch_size) for n in self._bucket_sizes().values())

    # ---- the epoch plan --------------------------------------------------------------------------------------
    def _epoch_layout(self):
        """Per bucket: instance item indices (x repeats) and per-(concept, bucket) prior quotas.

        Fixed across epochs, so every epoch has the same number of batches per bucket (a resumed run can
        skip exactly k batches); only which class images fill the prior quota rotates."""
        instance: dict[tuple, list[int]] = {}
        prior_pool: dict[tuple, list[int]] = {}          # (concept, bucket) -> class item indices
        for i, item in enumerate(self.items):
            if item.is_prior:
                prior_pool.setdefault((item.concept_index, item.bucket), []).append(i)
            else:
                reps = self.concepts[item.concept_index].repeats
                instance.setdefault(item.bucket, []).extend([i] * reps)
        quotas: dict[tuple, int] = {}
        for ci, concept in enumerate(self.concepts):
            pools = {b: p for (c, b), p in prior_pool.items() if c == ci}
            if not pools:
                continue
            fallback = max(sorted(pools), key=lambda b: len(pools[b]))
            for i, item in enumerate(self.items):
                if item.concept_index == ci and not item.is_prior:
                    key = (ci, item.bucket if item.bucket in pools else fallback)
                    quotas[key] = quotas.get(key, 0) + concept.repeats
        # a fixed shuffle of each pool; epoch e takes the next `quota` of them, cycling
        pools = {}
        for key, idx in prior_pool.items():
            order = list(idx)
            _rng(self.seed, "prior-order", key).shuffle(order)
            pools[key] = order
        return instance, pools, quotas

    def _bucket_sizes(self) -> dict[tuple, int]:
        instance, _, quotas = self._layout
        sizes = {b: len(v) for b, v in instance.items()}
        for (_, b), q in quotas.items():
            sizes[b] = sizes.get(b, 0) + q
        return sizes

    @property
    def examples_per_epoch(self) -> int:
        return sum(self._bucket_sizes().values())

    def largest_batch_plan(self) -> PlanItem:
        """A full batch of the largest bucket (by area): the most memory one step of this data can need."""
        by_bucket: dict[tuple, list[int]] = {}
        for i, item in enumerate(self.items):
            by_bucket.setdefault(item.bucket, []).append(i)
        bucket = max(by_bucket, key=lambda b: (b[0] * b[1], b))
        idx = by_bucket[bucket]
        items = tuple(idx[k % len(idx)] for k in range(self.batch_size))
        return PlanItem(epoch=0, position=0, bucket=bucket, items=items, flips=(False,) * len(items))

    def epoch_plan(self, epoch: int) -> list[PlanItem]:
        """The batches of `epoch`, in order. A function of (seed, epoch) only."""
        instance, pools, quotas = self._layout
        rng = _rng(self.seed, "epoch", epoch)
        per_bucket: dict[tuple, list[int]] = {b: list(v) for b, v in instance.items()}
        for (ci, b), quota in sorted(quotas.items()):
            pool = pools[(ci, b)]
            start = epoch * quota
            per_bucket.setdefault(b, []).extend(pool[(start + k) % len(pool)] for k in range(quota))
        batches = []
        for b in sorted(per_bucket):
            examples = per_bucket[b]
            rng.shuffle(examples)
            for s in range(0, len(examples), self.batch_size):
                batches.append((b, tuple(examples[s:s + self.batch_size])))
        rng.shuffle(batches)
        plan = []
        for pos, (b, idx) in enumerate(batches):
            flips = tuple(self.settings.random_flip and rng.random() < 0.5 for _ in idx)
            plan.append(PlanItem(epoch=epoch, position=pos, bucket=b, items=idx, flips=flips))
        return plan

    def without(self, indices: set) -> "TrainingData":
        """The same data less the items at `indices` (validation images held out of training): caches and report
        shared, the epoch plan made again over what is left."""
        import copy

        kept = copy.copy(self)
        kept.items = [item for i, item in enumerate(self.items) if i not in indices]
        kept._layout = kept._epoch_layout()
        kept.batches_per_epoch = sum(math.ceil(n / kept.batch_size) for n in kept._bucket_sizes().values())
        return kept

    # ---- latents ---------------------------------------------------------------------------------------------
    @property
    def vae_id(self) -> str:
        if self._vae_id is None:
            self._vae_id = module_fingerprint(self.model.vae)
        return self._vae_id

    def latent_key(self, item: Item, flipped: bool) -> str:
        p = item.placement
        return make_key("latent", self.vae_id, item.content_hash, p.original, p.resized, p.target,
                        p.crop_left, p.crop_top, bool(flipped), self.background if item.has_alpha else None)

    def _pixels(self, item: Item, flipped: bool):
        """The image as a (3, H, W) float tensor in [-1, 1], cropped to its bucket."""
        import numpy as np
        import torch

        from .buckets import apply_placement

        image = apply_placement(load_image(item.path, self.background), item.placement)
        if flipped:
            from PIL import Image
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def encode_latent_stats(self, items_and_flips: list[tuple[Item, bool]]) -> list[dict]:
        """VAE-encode images (same bucket) -> [{"mean": (C,h,w), "std": (C,h,w)}] on the CPU, float32."""
        import torch

        vae = self.model.vae
        pixels = torch.stack([self._pixels(item, f) for item, f in items_and_flips])
        param = next(vae.parameters())
        with torch.no_grad():
            dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()) and param.dtype != torch.float32:
                # SD-XL's VAE overflows in fp16: redo this batch with a float32 copy rather than cache NaNs
                # (a copy: the model we were given is shared and must not change, not even for a moment)
                if self._vae_fp32 is None:
                    import copy

                    self._vae_fp32 = copy.deepcopy(vae).to(torch.float32)
                dist = self._vae_fp32.encode(pixels.to(param.device, torch.float32)).latent_dist
                mean, std = dist.mean.float(), dist.std.float()
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise DatasetError(f"the VAE produced NaN/inf latents for {[i.path for i, _ in items_and_flips]}; "
                               "use a float32 VAE or a fixed fp16 VAE")
        return [{"mean": mean[k].cpu(), "std": std[k].cpu()} for k in range(len(items_and_flips))]

    def _latent_shape(self, item: Item) -> tuple[int, int, int]:
        f = self.model.vae_scale_factor
        return (self.model.vae.config.latent_channels, item.bucket[1] // f, item.bucket[0] // f)

    def latent_stats(self, item: Item, flipped: bool) -> dict:
        """Cached (or freshly encoded, when caching is off) latent mean/std of one image."""
        if self.latent_cache is None:
            return self.encode_latent_stats([(item, flipped)])[0]
        shape = self._latent_shape(item)
        expect = lambda t: set(t) == {"mean", "std"} and tuple(t["mean"].shape) == shape  # noqa: E731
        return self.latent_cache.get_or_compute(self.latent_key(item, flipped),
                                                lambda: self.encode_latent_stats([(item, flipped)])[0], expect)

    def fill_latent_cache(self, progress=None, should_stop=None, shard: tuple[int, int] = (0, 1),
                          sync: Callable[[], None] | None = None) -> None:
        """Encode every (image, flip) not yet cached, VAE_BATCH same-bucket images per call (with a disk cache
        and `shard=(rank, processes)`: only this process's share; `sync()` waits for every process)."""
        if self.latent_cache is None:
            return
        flips = (False, True) if self.settings.random_flip else (False,)
        todo = []
        for item in self.items:
            shape = self._latent_shape(item)
            for f in flips:
                key = self.latent_key(item, f)
                if self.latent_cache.get(key, lambda t: tuple(t["mean"].shape) == shape) is None:
                    todo.append((item, f))
        todo = self._share(todo, shard, sync)
        groups: dict[tuple, list] = {}
        for item, f in todo:
            groups.setdefault(item.bucket, []).append((item, f))
        total, done = len(todo), 0
        for bucket in sorted(groups):
            group = groups[bucket]
            for s in range(0, len(group), VAE_BATCH):
                if should_stop is not None and should_stop():
                    raise PreparationStopped("stopped while caching latents")
                chunk = group[s:s + VAE_BATCH]
                for (item, f), stats in zip(chunk, self.encode_latent_stats(chunk)):
                    self.latent_cache.put(self.latent_key(item, f), stats)
                done += len(chunk)
                if progress:
                    progress(done, total)
        fill_mask_cache(self, flips)

    # ---- text ------------------------------------------------------------------------------------------------
    @property
    def text_id(self) -> str:
        if self._text_id is None:
            self._text_id = module_fingerprint(*self.model.text_encoders)
        return self._text_id

    def text_key(self, caption: str) -> str:
        return make_key("text", self.text_id, self.model.family, caption, self.clip_skip,
                        self.settings.long_captions)

    def encode_text(self, captions: list[str]) -> list[dict]:
        """Encode captions -> [{"embeds": (77*k, D), "pooled": (P,) if SDXL}] on the CPU."""
        import torch

        from ..models.text import encode_prompts

        with torch.no_grad():
            out = encode_prompts(self.model, captions, clip_skip=self.clip_skip,
                                 long_prompts=self.settings.long_captions)
        result = []
        for k in range(len(captions)):
            entry = {"embeds": out.embeds[k].detach().cpu()}
            if out.pooled is not None:
                entry["pooled"] = out.pooled[k].detach().cpu()
            result.append(entry)
        return result

    def text_embeds(self, captions: list[str]) -> list[dict]:
        if self.text_cache is None:
            return self.encode_text(captions)
        found = {c: self.text_cache.get(self.text_key(c)) for c in dict.fromkeys(captions)}
        missing = [c for c, v in found.items() if v is None]
        for s in range(0, len(missing), TEXT_BATCH):
            chunk = missing[s:s + TEXT_BATCH]
            for c, entry in zip(chunk, self.encode_text(chunk)):
                self.text_cache.put(self.text_key(c), entry)
                found[c] = entry
        return [found[c] for c in captions]

    def _share(self, todo: list, shard: tuple[int, int], sync) -> list:
        """This process's share of the missing entries. Every process lists them before any writes (`sync`):
        a list made after another process's first writes would be shorter, the shares would shift, and some
        entries would be encoded twice and others by nobody."""
        rank, processes = shard
        if processes <= 1 or self.settings.cache_mode != "disk":
            return todo
        if sync is not None:
            sync()
        return todo[rank::processes]

    def fill_text_cache(self, progress=None, should_stop=None, shard: tuple[int, int] = (0, 1),
                        sync: Callable[[], None] | None = None) -> None:
        """Encode every fixed caption (and "" when dropout is on). Tag-shuffled variants are cached on use."""
        if self.text_cache is None:
            return
        captions = list(dict.fromkeys(item.caption for item in self.items))
        if self.settings.caption_dropout > 0:
            captions.append("")
        if self.settings.long_captions == "chunk":
            captions.append("")            # the padding chunk for batches mixing caption lengths
        captions = list(dict.fromkeys(captions))
        missing = self._share([c for c in captions if self.text_cache.get(self.text_key(c)) is None], shard, sync)
        for s in range(0, len(missing), TEXT_BATCH):
            if should_stop is not None and should_stop():
                raise PreparationStopped("stopped while caching text embeddings")
            chunk = missing[s:s + TEXT_BATCH]
            for c, entry in zip(chunk, self.encode_text(chunk)):
                self.text_cache.put(self.text_key(c), entry)
            if progress:
                progress(min(s + TEXT_BATCH, len(missing)), len(missing))

    def _stack_embeds(self, entries: list[dict]):
        """Stack per-caption embeddings; chunked captions of different lengths are padded with the
        encoding of an empty chunk (as ComfyUI and A1111 do), so a batch shares one sequence length."""
        import torch

        longest = max(e["embeds"].shape[0] for e in entries)
        rows = []
        pad = None
        for e in entries:
            emb = e["embeds"]
            if emb.shape[0] < longest:
                if pad is None:
                    pad = self.text_embeds([""])[0]["embeds"]
                reps = (longest - emb.shape[0]) // pad.shape[0]
                emb = torch.cat([emb] + [pad] * reps, dim=0)
            rows.append(emb)
        embeds = torch.stack(rows)
        pooled = torch.stack([e["pooled"] for e in entries]) if "pooled" in entries[0] else None
        return embeds, pooled

    # ---- batches ---------------------------------------------------------------------------------------------
    def caption_for(self, plan_item: PlanItem, k: int) -> str:
        item = self.items[plan_item.items[k]]
        s = self.settings
        rng = _rng(self.seed, "caption", plan_item.epoch, plan_item.position, k)
        return caption_variant(item.caption, shuffle=s.shuffle_tags, keep_tokens=s.keep_tokens,
                               dropout=s.caption_dropout, rng=rng)

    def load_batch(self, plan_item: PlanItem, *, device=None, dtype=None, generator=None) -> Batch:
        """The tensors of one planned batch. `generator` draws the VAE posterior sample (so cached latents
        still vary like freshly encoded ones); pass a seeded generator for reproducible runs, or a list of
        them, one per example."""
        import torch

        # ComfyUI runs nodes under inference_mode; tensors made there cannot enter autograd. Build the
        # batch as ordinary tensors whatever the caller's mode.
        with torch.inference_mode(False):
            return self._load_batch(plan_item, device=device, dtype=dtype, generator=generator)

    def _load_batch(self, plan_item: PlanItem, *, device, dtype, generator) -> Batch:
        import torch

        items = [self.items[i] for i in plan_item.items]
        stats = [self.latent_stats(item, f) for item, f in zip(items, plan_item.flips)]
        mean = torch.stack([s["mean"] for s in stats])
        std = torch.stack([s["std"] for s in stats])
        if isinstance(generator, (list, tuple)):     # one generator per example: a draw that does not depend on
            noise = torch.stack([torch.randn(mean.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                                 .to(mean.device) for g in generator])   # which batch or process holds it
        else:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=torch.float32)
        latents = mean + std * noise.to(mean.device)
        cfg = self.model.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        latents = (latents - shift) * cfg.scaling_factor
        latents = latents.to(device=device or latents.device, dtype=dtype or latents.dtype)

        captions = [self.caption_for(plan_item, k) for k in range(len(items))]
        embeds = pooled = None
        if not self.text_encoder_trained:
            embeds, pooled = self._stack_embeds(self.text_embeds(captions))
            embeds = embeds.to(device=device or embeds.device, dtype=dtype or embeds.dtype)
            if pooled is not None:
                pooled = pooled.to(device=device or pooled.device, dtype=dtype or pooled.dtype)

        time_ids = None
        if self.model.is_sdxl:
            from ..models.text import sdxl_time_ids

            rows = []
            for item, f in zip(items, plan_item.flips):
                p = item.placement
                rows.append(sdxl_time_ids((p.original[1], p.original[0]), p.crop_top_left(f),
                                          (p.target[1], p.target[0])))
            time_ids = torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in rows])
            time_ids = time_ids.to(device=device or time_ids.device, dtype=dtype or time_ids.dtype)

        masks = batch_masks(self, items, plan_item.flips)
        is_prior = torch.tensor([item.is_prior for item in items], dtype=torch.bool, device=device)
        weights = torch.tensor([self.concepts[item.concept_index].prior_loss_weight if item.is_prior else 1.0
                                for item in items], dtype=torch.float32, device=device)
        return Batch(latents=latents, captions=captions, embeds=embeds, pooled=pooled, is_prior=is_prior,
                     loss_weights=weights, time_ids=time_ids, paths=[item.path for item in items],
                     concept_indices=[item.concept_index for item in items], flips=list(plan_item.flips),
                     masks=None if masks is None else masks.to(device=device or masks.device))

    def iter_epoch(self, epoch: int, *, skip: int = 0, **load_kwargs):
        """Yield (plan_item, batch) for `epoch`, skipping the first `skip` batches (resume)."""
        for plan_item in self.epoch_plan(epoch)[skip:]:
            yield plan_item, self.load_batch(plan_item, **load_kwargs)

    def report_text(self) -> str:
        return self.report.report_text()

    def describe_epochs(self, report: DatasetReport, grad_accum: int) -> None:
        """Fill the report's per-epoch numbers (buckets, batches, optimizer steps, divisibility)."""
        instance, _, quotas = self._layout
        report.buckets = {}
        for b, idx in instance.items():
            report.buckets.setdefault(bucket_name(b), {"instance": 0, "prior": 0})["instance"] = len(idx)
        for (ci, b), q in quotas.items():
            report.buckets.setdefault(bucket_name(b), {"instance": 0, "prior": 0})["prior"] += q
            report.concepts[ci].prior_examples_per_epoch += q
        for b, n in self._bucket_sizes().items():
            report.buckets[bucket_name(b)]["batches"] = math.ceil(n / self.batch_size)
        report.examples_per_epoch = self.examples_per_epoch
        report.batch_size = self.batch_size
        report.gradient_accumulation_steps = grad_accum
        report.batches_per_epoch = self.batches_per_epoch
        report.optimizer_steps_per_epoch = math.ceil(self.batches_per_epoch / grad_accum)
        report.partial_batches_per_epoch = sum(1 for n in self._bucket_sizes().values() if n % self.batch_size)
        ok, msg = divisibility_check(self.concepts, [c.instance_images for c in report.concepts],
                                     [c.prior_examples_per_epoch for c in report.concepts], self.batch_size,
                                     grad_accum)
        if ok and report.partial_batches_per_epoch:
            msg += (f"; {report.partial_batches_per_epoch} bucket(s) end in a smaller batch because a batch never "
                    "mixes buckets")
        report.divisible, report.divisibility = ok, msg


__all__ = ["DatasetError", "PreparationStopped", "Item", "PlanItem", "Batch", "TrainingData", "TOKEN_LIMIT"]
