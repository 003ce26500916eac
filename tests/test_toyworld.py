"""The toy world: rendering is deterministic, the evaluator reads held-out degraded renders (>= 98 % per
attribute) and tells a subject from near misses, and the CLI draws images and writes the base."""
import os
import random
import subprocess
import sys

import pytest
import torch

from comfyui_dreambooth.training.toyworld import evaluate, world


def test_render_is_deterministic_and_in_the_contract():
    a = world.draw_world(6, seed=3)
    b = world.draw_world(6, seed=3)
    assert [x[0].tobytes() for x in a] == [x[0].tobytes() for x in b]
    for image, text, toy, bg in a:
        assert image.size == (64, 64) and image.mode == "RGB"
        assert toy.nameable and toy.colour != bg or world.COLOURS[toy.colour] != world.BACKGROUNDS[bg]
        assert text == "" or text.startswith("a ") and "toy" in text


def test_captions_leave_parts_out_so_each_can_be_asked_alone():
    rng = random.Random(0)
    toy = world.Toy("star", "red")
    seen = {world.pretraining_caption(toy, "blue", rng) for _ in range(400)}
    for text in ("a red star toy on a blue background", "a star toy", "a red toy", "a toy on a blue background",
                 "a toy", ""):
        assert text in seen, text


def test_class_only_captions_raise_the_bare_class_prompts_share():
    """Left to chance "a toy" is 0.9 x 0.25^3 = 1.4 % of captions; class_only adds its own share on top."""
    toy = world.Toy("star", "red")

    def share(**kw):
        rng = random.Random(1)
        return sum(world.pretraining_caption(toy, "blue", rng, **kw) == "a toy" for _ in range(4000)) / 4000

    assert 0.005 < share() < 0.03
    assert 0.10 < share(class_only=0.12) < 0.14


def test_subjects_cannot_be_named_by_the_vocabulary():
    for s in world.SUBJECTS.values():
        assert not s.toy.nameable
        assert s.allowed_backgrounds() and all(b not in s.toy.colours for b in s.allowed_backgrounds())


def test_parse_toy_and_its_errors():
    assert world.parse_toy("red/blue split circle") == world.Toy("circle", "red", "split", "blue")
    assert world.parse_toy("green heart") == world.Toy("heart", "green")
    with pytest.raises(ValueError, match="shape 'blob'"):
        world.parse_toy("red blob")
    with pytest.raises(ValueError, match="COLOUR SHAPE"):
        world.parse_toy("red")


def test_evaluator_reads_held_out_degraded_renders():
    acc = evaluate.check_accuracy(count=400, seed=321)
    assert min(acc.values()) >= 0.98, acc


@pytest.mark.parametrize("name", sorted(world.SUBJECTS))
def test_evaluator_tells_the_subject_from_near_misses(name):
    subject = world.SUBJECTS[name]
    judge = evaluate.calibrate_subject(subject, world.draw_subject(subject, 5, seed=11), count=120, seed=1)
    pos, neg = evaluate._calibration_sets(subject, 100, random.Random(777))     # held out: another seed
    right = sum(judge.shows(im) for im in pos) + sum(not judge.shows(im) for im in neg)
    assert right / (len(pos) + len(neg)) >= 0.95, (name, judge.threshold)


def test_diversity_and_entropy_tell_spread_from_collapse():
    rng = random.Random(5)
    spread = [evaluate.analyse(world.render(*world.random_world_toy(rng), rng)) for _ in range(40)]
    same = [evaluate.analyse(world.render(world.Toy("circle", "red"), "white", rng)) for _ in range(40)]
    assert evaluate.diversity(spread) > 2 * evaluate.diversity(same)
    assert evaluate.attribute_entropy(spread) > 0.7 > evaluate.attribute_entropy(same)


@pytest.mark.slow
def test_cli_draws_subject_and_world_images(tmp_path):
    cmd = [sys.executable, "-m", "comfyui_dreambooth", "toyworld", "draw"]
    out = subprocess.run(cmd + [str(tmp_path / "s"), "--subject", "split_circle", "--count", "3"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(os.listdir(tmp_path / "s")) == 3
    out = subprocess.run(cmd + [str(tmp_path / "w"), "--count", "2", "--captions"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path / "w")) == ["toy_000.png", "toy_000.txt", "toy_001.png", "toy_001.txt"]
    bad = subprocess.run(cmd + [str(tmp_path / "x"), "--toy", "red blob"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "shape 'blob'" in bad.stderr


@pytest.mark.slow
def test_pretrain_script_makes_a_checkpoint_the_pack_loads(tmp_path):
    """The pretraining pipeline end to end at toy sizes (the real run: README, training/toyworld/pretrain_log.jsonl)."""
    from comfyui_dreambooth.training.models import load_model
    from comfyui_dreambooth.training.toyworld.pretrain import main

    out = tmp_path / "base.safetensors"
    assert main(["--out", str(out), "--log", str(tmp_path / "log.jsonl"), "--images", "40", "--vae-steps", "2",
                 "--decoder-steps", "2", "--unet-steps", "2", "--offset-steps", "2", "--batch", "4",
                 "--threads", "1"]) == 0
    model = load_model(str(out), dtype="fp32")
    assert model.family == "sd1" and model.vae_scale_factor == 4 and model.unet.config.sample_size == 16
    stages = [line.split('"stage": "')[1].split('"')[0] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert stages[0] == "start" and stages[-1] == "done" and "latents" in stages
    assert model.prediction_type == "epsilon" and not model.zero_terminal_snr
    # the shipped base's second run: from the first file (its VAE kept), v prediction on zero terminal SNR
    second = tmp_path / "base_v.safetensors"
    assert main(["--out", str(second), "--start-from", str(out), "--v-prediction", "--images", "40",
                 "--unet-steps", "2", "--batch", "4", "--threads", "1"]) == 0
    again = load_model(str(second), dtype="fp32")
    assert again.prediction_type == "v_prediction" and again.zero_terminal_snr
    assert all(torch.equal(a, b) for a, b in zip(model.vae.state_dict().values(), again.vae.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(),
                                                      again.unet.state_dict().values()))
    # stage 1c: only the decoder changes (the latent space and the text-to-image model stay)
    third = tmp_path / "base_codec.safetensors"
    assert main(["--out", str(third), "--start-from", str(second), "--codec-steps", "2", "--images", "40",
                 "--threads", "1"]) == 0
    codec = load_model(str(third), dtype="fp32")
    assert codec.prediction_type == "v_prediction" and codec.zero_terminal_snr

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    assert same(again.unet, codec.unet) and same(again.text_encoders[0], codec.text_encoders[0])
    assert same(again.vae.encoder, codec.vae.encoder) and same(again.vae.quant_conv, codec.vae.quant_conv)
    assert not same(again.vae.decoder, codec.vae.decoder)


@pytest.mark.slow
def test_pretrain_a_new_unet_layout_on_the_shipped_codec(tmp_path):
    """--unet-layout sd15 --start-from the shipped base: a fresh UNet that attends at the finest level (SD1.5's
    placement) on the base's own VAE and text encoder; the default layout is the shipped base's."""
    from comfyui_dreambooth.training.models import load_model
    from comfyui_dreambooth.training.toyworld.commands import base_path
    from comfyui_dreambooth.training.toyworld.pretrain import UNET_LAYOUTS, main

    shipped = load_model(base_path(), dtype="fp32")
    assert tuple(shipped.unet.config.down_block_types) == UNET_LAYOUTS["coarse"][0]
    out = tmp_path / "sd15_layout.safetensors"
    assert main(["--out", str(out), "--start-from", base_path(), "--unet-layout", "sd15", "--v-prediction",
                 "--images", "8", "--unet-steps", "2", "--batch", "2", "--threads", "1", "--device", "cpu"]) == 0
    fresh = load_model(str(out), dtype="fp32")
    assert tuple(fresh.unet.config.down_block_types) == UNET_LAYOUTS["sd15"][0]
    assert tuple(fresh.unet.config.up_block_types) == UNET_LAYOUTS["sd15"][1]
    assert fresh.prediction_type == "v_prediction" and fresh.zero_terminal_snr
    assert all(torch.equal(a, b) for a, b in zip(shipped.vae.state_dict().values(), fresh.vae.state_dict().values()))
    assert any(n.startswith("down_blocks.0.attentions.") for n, _ in fresh.unet.named_parameters())


def test_codec_objects_have_two_colours_and_are_never_a_subject():
    from comfyui_dreambooth.training.toyworld.evaluate import analyse
    from comfyui_dreambooth.training.toyworld.pretrain import codec_objects, codec_toys

    toys = codec_toys(3000, seed=3)
    subjects = {s.toy for s in world.SUBJECTS.values()}
    assert not subjects & {toy for toy, _ in toys}
    assert all(toy.second and toy.second != toy.colour and toy.pattern != "plain" for toy, _ in toys)
    assert all(world.BACKGROUNDS[bg] not in (world.COLOURS[t.colour], world.COLOURS[t.second]) for t, bg in toys)
    images = codec_objects(40, seed=3)
    assert len(images) == 40 and all(im.size == (world.SIZE, world.SIZE) for im in images)
    # two colours in most (a small dot can fall under the evaluator's 15 % share)
    assert sum(len(analyse(im).colours) >= 2 for im in images) >= 30


@pytest.mark.slow
def test_the_shipped_base_loads_as_sd1_and_the_cli_writes_it(tmp_path):
    from comfyui_dreambooth.training.models import load_model
    from comfyui_dreambooth.training.toyworld.commands import base_path

    out = tmp_path / "toy.safetensors"
    run = subprocess.run([sys.executable, "-m", "comfyui_dreambooth", "toyworld", "base", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == open(base_path(), "rb").read()
    model = load_model(str(out), dtype="fp32")       # LoadBaseModel's default dtype; the file is fp16
    # v prediction on a zero-terminal-SNR schedule, read from the file's own markers (v_pred, ztsnr keys)
    assert model.family == "sd1" and model.prediction_type == "v_prediction" and model.zero_terminal_snr
    assert model.vae_scale_factor == 4
    bad = subprocess.run([sys.executable, "-m", "comfyui_dreambooth", "toyworld", "base", str(tmp_path / "x.ckpt")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "must end in .safetensors" in bad.stderr
