"""Pretrain the toy base: a small SD1-layout model (AutoencoderKL + CLIP text model + UNet) that knows the toy world.

    python -m comfyui_dreambooth.training.toyworld.pretrain --out toy_base.safetensors [--unet-steps N]

Stages, all on rendered images (world.draw_world): 1. the VAE learns to reconstruct 64×64 images through a 16×16×4
latent (on 32×32 crops: cheap); 1b. its decoder alone is polished on whole images (the latent space stays); 2. the UNet and the text encoder learn together to denoise those latents from captions with parts left out
(and 10 % empty captions, so classifier-free guidance works). The UNet's EMA weights are saved. 1c (`--start-from
FILE --codec-steps N`, on a finished base): the decoder alone again, on world images mixed half and half with
uncaptioned objects of two colours (split, stripes, dot: any outline, any pair of colours, never one of the
benchmark's subjects). The decoder is the model's image codec, like SD's VAE, which can draw any dog: trained on
single-colour objects only, it drew a red/blue split circle's red half orange on a white background, so no
fine-tune could show the subject. The encoder, so the latent space the UNet knows, is unchanged, and nothing with a
caption is added: the text-to-image model still cannot name or draw a subject. The file is an
ordinary single-file SD1 checkpoint: LoadBaseModel, the trainer and the samplers use it like any other.
Log lines (JSON) go to --log; a checkpoint is written every --save-every steps, so a run can be looked at early.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time

from .world import SIZE, draw_world, pretraining_caption

LATENT_SIZE = 16
TEXT_WIDTH = 64
# Where the UNet attends: "coarse" (the shipped base: the 8x8 and 4x4 levels, SDXL-like, none at the finest) or
# "sd15" (SD1.5's placement: every level but the coarsest, so the 16x16 level has cross-attention). On the coarse
# layout an outline or a pattern finer than 8x8 lives in convolutions that the default LoRA targets never touch
# (README "Toy world": LoRA learns none of the four subjects the vocabulary cannot outline)
UNET_LAYOUTS = {
    "coarse": (("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    "sd15": (("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}


def toy_unet(layout: str = "coarse"):
    """The toy base's UNet, random init, with attention where `layout` (UNET_LAYOUTS) puts it."""
    from diffusers import UNet2DConditionModel

    down, up = UNET_LAYOUTS[layout]
    return UNet2DConditionModel(sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64, 128), cross_attention_dim=TEXT_WIDTH,
                                attention_head_dim=8, norm_num_groups=32, down_block_types=down, up_block_types=up)


def build_toy_model(seed: int = 0, layout: str = "coarse"):
    """The toy base's architecture, random init (sizes: see the README's toy-world section)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.components import SDModel
    from ..models.tokenizing import tokenizers_for_family

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=16, sample_size=SIZE, scaling_factor=1.0)
    unet = toy_unet(layout)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=TEXT_WIDTH * 4,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                      hidden_act="quick_gelu", projection_dim=TEXT_WIDTH, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=1))
    return SDModel(family="sd1", prediction_type="epsilon", unet=unet, vae=vae, text_encoders=[te],
                   tokenizers=tokenizers_for_family("sd1"), source_hash=f"toy-world-{seed}")


def _to_tensor(images):
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Log:
    def __init__(self, path: str | None):
        self.file = open(path, "a", encoding="utf-8") if path else None
        self.start = time.time()

    def __call__(self, **record):
        record["elapsed_s"] = round(time.time() - self.start, 1)
        line = json.dumps(record)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def train_vae(vae, images, steps: int, batch: int, lr: float, log, seed: int = 0, crop: int = 32) -> float:
    """Reconstruction (L1 + MSE) with a small KL term; returns the last logged reconstruction MSE."""
    import torch

    data = _to_tensor(images)
    gen = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)

    def step_loss():
        x = data[torch.randint(0, len(data), (batch,), generator=gen)]
        if crop:      # the VAE is convolutional: crops teach it the same edges and colours at a quarter of the cost
            top, left = (int(v) for v in torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=gen))
            x = x[:, :, top:top + crop, left:left + crop]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(generator=gen)).sample
        mse = (recon - x).pow(2).mean()
        return mse + 0.5 * (recon - x).abs().mean() + 1e-6 * dist.kl().mean(), mse

    last = _reconstruction_loop(opt, steps, lr, step_loss, log, "vae")
    vae.eval().requires_grad_(False)
    return last


def _reconstruction_loop(opt, steps: int, lr: float, step_loss, log, stage: str) -> float:
    """The VAE stages' shared loop: learning-rate schedule, step, MSE logged every 50 steps; returns the last."""
    running, last = 0.0, float("nan")
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, 50)
        loss, mse = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += mse.item()
        if (step + 1) % 50 == 0:
            log(stage=stage, step=step + 1, mse=round(running / 50, 5))
            last, running = running / 50, 0.0
    return last


def polish_decoder(vae, images, steps: int, batch: int, lr: float, log, seed: int = 0) -> float:
    """Stage 1b: train the decoder alone on whole images (the encoder, so the latent space the UNet learns, stays
    as it is): stage 1's short run on crops leaves colours off; this makes decoding exact. Returns the last MSE."""
    import torch

    data = _to_tensor(images)
    gen = torch.Generator().manual_seed(seed + 1)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.eval().requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def step_loss():
        x = data[torch.randint(0, len(data), (batch,), generator=gen)]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen)
        recon = vae.decode(z).sample
        mse = (recon - x).pow(2).mean()
        return mse + 0.5 * (recon - x).abs().mean(), mse

    last = _reconstruction_loop(opt, steps, lr, step_loss, log, "decoder")
    vae.eval().requires_grad_(False)
    return last


def codec_toys(count: int, seed: int = 0) -> list:
    """`count` (toy, background) for the decoder's stage 1c: any outline (vocabulary or extra), a split / stripes /
    dot pattern, two different colours, a background unlike both; never the toy of a benchmark subject
    (world.SUBJECTS)."""
    from .world import BACKGROUNDS, COLOURS, EXTRA_SHAPES, SHAPES, SUBJECTS, Toy

    rng = random.Random(seed)
    subjects = {s.toy for s in SUBJECTS.values()}
    out = []
    while len(out) < count:
        first, second = rng.sample(list(COLOURS), 2)
        toy = Toy(rng.choice(SHAPES + EXTRA_SHAPES), first, rng.choice(("split", "stripes", "dot")), second)
        backgrounds = [b for b in BACKGROUNDS if BACKGROUNDS[b] not in (COLOURS[first], COLOURS[second])]
        if toy not in subjects and backgrounds:
            out.append((toy, rng.choice(backgrounds)))
    return out


def codec_objects(count: int, seed: int = 0) -> list:
    """The images of codec_toys(count, seed)."""
    from .world import render

    rng = random.Random(seed + 1)
    return [render(toy, background, rng) for toy, background in codec_toys(count, seed)]


def polish_codec(start_from: str, out: str, *, steps: int, images: int = 8192, seed: int = 0,
                 log_path: str | None = None, threads: int | None = None) -> str:
    """Stage 1c on a finished base: its decoder on world images + codec_objects, half and half; the UNet, text
    encoder and encoder are copied unchanged."""
    import torch

    from ..models import load_model, save_single_file

    if threads:
        torch.set_num_threads(threads)
    log = _Log(log_path)
    log(stage="codec start", start_from=start_from, steps=steps, images=images, seed=seed, torch=torch.__version__,
        threads=torch.get_num_threads())
    model = load_model(start_from, dtype="fp32")
    pictures = [w[0] for w in draw_world(images // 2, seed=seed + 7, drop=0.0)] + codec_objects(images // 2, seed)
    mse = polish_decoder(model.vae, pictures, steps, 16, 5e-4, log, seed + 7)
    from safetensors import safe_open

    with safe_open(start_from, "pt") as f:            # the base's own toyworld.* keys (its step count) go along
        carried = {k: v for k, v in (f.metadata() or {}).items() if k.startswith("toyworld.")}
    save_single_file(model, out, dtype="fp16", metadata={**carried, "toyworld.codec_steps": str(steps)})
    log(stage="codec saved", path=out, vae_mse=round(mse, 5))
    return out


def centre_latents(vae, means):
    """Shift the VAE's latent space so its per-channel mean is 0, exactly (no retraining): the encoder's mean
    output loses the channel means and the decoder's first 1×1 conv adds them back. SD's samplers start from
    zero-mean noise, and the SD schedule never reaches pure noise: with a latent mean far from 0 (here up to a
    whole std) a sample starts off its data, which shows as a colour cast. Returns the centred means."""
    import torch

    mu = means.mean(dim=(0, 2, 3))
    channels = mu.numel()
    with torch.no_grad():
        vae.quant_conv.bias[:channels] -= mu
        vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ mu
    return means - mu[None, :, None, None]


def encode_latents(vae, images, batch: int = 256):
    """(mean, std) of the VAE's latent distribution for each image."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            dist = vae.encode(_to_tensor(images[i:i + batch])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_denoiser(model, means, stds, toys, steps: int, batch: int, lr: float, log, *, seed: int = 0,
                   save_every: int = 0, save=None, ema_decay: float = 0.999, min_snr_gamma: float = 5.0,
                   offset_noise: float = 0.0, stage: str = "unet", class_only: float = 0.0, device: str = "cpu"):
    """UNet + text encoder on the SD noise schedule, min-SNR weighting, EMA of both. The model's prediction type
    and zero-terminal-SNR flag choose the target (epsilon, or v on the rescaled schedule).

    Zero terminal SNR: the noisiest training input is pure noise, so the model has to take the image's average
    colour (here: the background) from the prompt. On the plain SD schedule a 16×16 latent's noisiest input still
    shows that colour, and a sampler's starting noise then picks the background instead of the prompt.

    offset_noise: a per-image, per-channel constant added to the noise. The SD schedule never reaches pure noise;
    on a 16×16 latent the mean of the noisiest input still tells the image's average colour, so a model trained
    without it copies the colour of its starting noise and ignores the prompt's background (stage 3).

    device: where the UNet, the text encoder and their EMA train ("cuda" on a GPU); every random draw is made on
    the CPU generator first, so a run's data, noise and timesteps are the same on any device."""

    import torch
    from diffusers import DDPMScheduler

    from ..models.components import SD_NOISE_SCHEDULE
    from ..models.text import encode_tokens, tokenize

    v_pred = model.prediction_type == "v_prediction"
    sched = DDPMScheduler(**SD_NOISE_SCHEDULE, prediction_type=model.prediction_type,
                          rescale_betas_zero_snr=model.zero_terminal_snr)
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    # min-SNR-γ as a weight on the target's error: eps error × min(snr, γ)/snr; v error × min(snr + 1, γ)/(snr + 1)
    # (the +1 keeps the pure-noise step, snr 0, in the loss: it is where the background is decided)
    weights = (torch.clamp(snr + 1, max=min_snr_gamma) / (snr + 1) if v_pred
               else torch.clamp(snr, max=min_snr_gamma) / snr)
    weights = weights.to(device)
    unet, te = model.unet.to(device), model.text_encoders[0].to(device)
    unet.train().requires_grad_(True)
    te.train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    ema_te = copy.deepcopy(te).eval().requires_grad_(False)     # the UNet's EMA must meet the text it was made for
    pairs = list(zip(ema.parameters(), unet.parameters())) + list(zip(ema_te.parameters(), te.parameters()))
    opt = torch.optim.AdamW([{"params": unet.parameters()}, {"params": te.parameters()}], lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    scale = model.vae.config.scaling_factor
    token_cache: dict[str, object] = {}
    running, count = 0.0, 0

    def tokens(caps):
        missing = [c for c in set(caps) if c not in token_cache]
        if missing:
            for c, ids in zip(missing, tokenize(model, missing)[0]):
                token_cache[c] = ids
        return [torch.stack([token_cache[c] for c in caps]).to(device)]

    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, 200)
        idx = torch.randint(0, len(means), (batch,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        caps = [pretraining_caption(toys[i][0], toys[i][1], rng, class_only=class_only) for i in idx.tolist()]
        noise = torch.randn(latents.shape, generator=gen)
        if offset_noise:
            noise = noise + offset_noise * torch.randn((batch, latents.shape[1], 1, 1), generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        latents, noise, t = latents.to(device), noise.to(device), t.to(device)
        noisy = sched.add_noise(latents, noise, t)
        embeds = encode_tokens(model, tokens(caps)).embeds
        pred = unet(noisy, t, embeds).sample
        target = sched.get_velocity(latents, noise, t) if v_pred else noise
        loss = (weights[t] * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(te.parameters()), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in pairs:
                e.lerp_(p, 1 - decay)
        running += loss.item()
        count += 1
        if (step + 1) % 25 == 0:
            log(stage=stage, step=step + 1, loss=round(running / count, 5), lr=round(opt.param_groups[0]["lr"], 7))
            running, count = 0.0, 0
        if save is not None and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save(ema, ema_te, step + 1)
    unet.eval().requires_grad_(False).cpu()
    te.eval().requires_grad_(False).cpu()
    return ema.cpu(), ema_te.cpu()


def pretrain(out: str, *, images: int = 30000, vae_steps: int = 300, decoder_steps: int = 1200,
             unet_steps: int = 2500, offset_steps: int = 0, batch: int = 64, seed: int = 0, lr: float = 4e-4,
             start_from: str | None = None, centre: bool = True, offset_noise: float = 0.05,
             v_prediction: bool = False, log_path: str | None = None, save_every: int = 500,
             threads: int | None = None, class_only: float = 0.0, layout: str | None = None,
             device: str = "cpu"):
    """v_prediction: train v on the zero-terminal-SNR schedule (offset noise off: it has no purpose there).
    start_from: a toy base made earlier; its VAE is kept (stage 1 skipped) and its UNet and text encoder go on
    learning in stage 2 (e.g. with another prediction type).
    layout: the UNet's attention placement (UNET_LAYOUTS; default "coarse"); with start_from, a fresh UNet of that
    layout replaces the file's (its VAE and text encoder are kept), so a new layout needs no new codec.
    device: where stage 2 trains ("cuda" on a GPU; stage 1, the VAE, stays on the CPU)."""
    import torch

    from ..models import load_model, save_single_file

    if threads:
        torch.set_num_threads(threads)
    log = _Log(log_path)
    log(stage="start", images=images, vae_steps=vae_steps, decoder_steps=decoder_steps, unet_steps=unet_steps,
        batch=batch, seed=seed, lr=lr, v_prediction=v_prediction, start_from=start_from, class_only=class_only,
        layout=layout or ("start_from's" if start_from else "coarse"), device=device, torch=torch.__version__,
        threads=torch.get_num_threads())
    if start_from:
        model = load_model(start_from, dtype="fp32")
        if layout:
            torch.manual_seed(seed)
            model = model.replace(unet=toy_unet(layout))
    else:
        model = build_toy_model(seed, layout or "coarse")
    model = model.replace(prediction_type="v_prediction" if v_prediction else "epsilon",
                          zero_terminal_snr=v_prediction)
    offset_noise = 0.0 if v_prediction else offset_noise
    world = draw_world(images, seed=seed, drop=0.0)
    toys = [(w[2], w[3]) for w in world]
    log(stage="drawn", images=len(world))
    if start_from:                  # its VAE is done (centred, scaled): only the latents are needed
        means, stds = encode_latents(model.vae, [w[0] for w in world])
        log(stage="stage1 loaded", path=start_from, scaling_factor=model.vae.config.scaling_factor)
    else:
        means, stds = _stage1(model, world, out, images, vae_steps, decoder_steps, seed, centre, log)
    del world

    def save(unet, te, step):     # (copies on the CPU: during stage 2 the EMA may live on the accelerator)
        snapshot = model.replace(unet=copy.deepcopy(unet).cpu(), text_encoders=[copy.deepcopy(te).cpu()])
        save_single_file(snapshot, out, dtype="fp16", metadata={"toyworld.steps": str(step)})
        log(stage="saved", step=step, path=out)

    ema, ema_te = train_denoiser(model, means, stds, toys, unet_steps, batch, lr, log, seed=seed,
                                 save_every=save_every, save=save, offset_noise=offset_noise, class_only=class_only,
                                 device=device)
    model.unet.load_state_dict(ema.state_dict())     # stage 3 goes on from the EMA weights (as saved)
    model.text_encoders[0].load_state_dict(ema_te.state_dict())
    save(ema, ema_te, unet_steps)
    if offset_steps:
        ema, ema_te = train_denoiser(model, means, stds, toys, offset_steps, batch, lr / 4, log, seed=seed + 2,
                                     save=None, offset_noise=0.0 if v_prediction else 0.1, stage="offset",
                                     device=device)
        save(ema, ema_te, unet_steps + offset_steps)
    log(stage="done")
    return out


def _stage1(model, world, out, images, vae_steps, decoder_steps, seed, centre, log):
    """Stages 1 and 1b (cached beside the output: a second run with other UNet settings starts at stage 2).
    Sets the VAE's scaling factor; returns the latents' (means, stds)."""
    import torch

    cache = f"{out}.stage1-{images}-{vae_steps}-{seed}.pt"
    if os.path.isfile(cache):
        saved = torch.load(cache, weights_only=True)
        model.vae.load_state_dict(saved["vae"])
        means, stds, vae_mse = saved["means"], saved["stds"], float(saved["vae_mse"])
        log(stage="stage1 cached", path=cache)
    else:
        pictures = [w[0] for w in world]
        vae_mse = train_vae(model.vae, pictures[:8192], vae_steps, 32, 2e-3, log, seed)
        means, stds = encode_latents(model.vae, pictures)
        torch.save({"vae": model.vae.state_dict(), "means": means, "stds": stds, "vae_mse": vae_mse}, cache)
        del pictures
    if decoder_steps:
        vae_mse = polish_decoder(model.vae, [w[0] for w in world[:8192]], decoder_steps, 16, 1e-3, log, seed)
    if centre:
        means = centre_latents(model.vae, means)
    scale = 1.0 / float(means.std())
    model.vae.register_to_config(scaling_factor=scale)
    log(stage="latents", count=len(means), scaling_factor=round(scale, 5), vae_mse=round(vae_mse, 5))
    return means, stds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--log", default=None)
    p.add_argument("--images", type=int, default=30000)
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--decoder-steps", type=int, default=1200)
    p.add_argument("--unet-steps", type=int, default=2500)
    p.add_argument("--offset-steps", type=int, default=0, help="stage 3: more steps with offset noise 0.1")
    p.add_argument("--offset-noise", type=float, default=0.05, help="offset noise in stage 2")
    p.add_argument("--no-centre", dest="centre", action="store_false", help="keep the latent means (not centred)")
    p.add_argument("--start-from", default=None,
                   help="a toy base made earlier: keep its VAE, go on training its UNet and text encoder")
    p.add_argument("--v-prediction", action="store_true", help="v prediction on a zero-terminal-SNR schedule")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--class-only", type=float, default=0.0,
                   help='share of captions that are the bare class prompt "a toy" (besides those with every part '
                        'left out)')
    p.add_argument("--unet-layout", choices=tuple(UNET_LAYOUTS), default=None,
                   help="where the UNet attends (default coarse, the shipped base); with --start-from a fresh UNet "
                        "of this layout replaces the file's, its VAE and text encoder kept")
    p.add_argument("--device", default="cpu", help='where the UNet and text encoder train ("cuda" on a GPU)')
    p.add_argument("--codec-steps", type=int, default=0,
                   help="stage 1c only, on --start-from: its decoder on world + two-colour objects (see above)")
    a = p.parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    if a.codec_steps:
        if not a.start_from:
            p.error("--codec-steps needs --start-from (a finished base)")
        polish_codec(a.start_from, a.out, steps=a.codec_steps, images=min(a.images, 8192), seed=a.seed,
                     log_path=a.log, threads=a.threads)
        return 0
    pretrain(a.out, images=a.images, vae_steps=a.vae_steps, decoder_steps=a.decoder_steps, unet_steps=a.unet_steps,
             offset_steps=a.offset_steps, start_from=a.start_from, centre=a.centre, offset_noise=a.offset_noise,
             v_prediction=a.v_prediction, lr=a.lr, batch=a.batch, seed=a.seed, log_path=a.log,
             save_every=a.save_every, threads=a.threads, class_only=a.class_only, layout=a.unet_layout,
             device=a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
