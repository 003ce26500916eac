"""Write example_workflows/*.json (canvas format) from the nodes' INPUT_TYPES.

    /tmp/venv/bin/python tests/make_example_workflows.py [--check]

Widget values start from each node's defaults (so their order always matches INPUT_TYPES); only the values an
example changes are spelled out below. Regenerate after changing a node's inputs; `--check` exits 1 when a file
differs from what this script would write. Settings follow the A1111 DreamBooth guide: LoRA learning rate ~1e-4,
full fine-tune ~1e-6, constant_with_warmup, 100-175 steps per image.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workflow_tools import Canvas  # noqa: E402

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows")
BASE_MODEL = "v1-5-pruned-emaonly.safetensors"
PERSON_LORA = "dreambooth/ohwx_person"            # SaveLoRA filename; LoraLoader sees it as <this>.safetensors
COL = 440                                           # column width on the canvas
# Rows below the settings nodes leave room for the memory estimate they show once run (~220 px more; measured in
# ComfyUI's frontend by tests/test_web_frontend.py): Data ends near y 640 then, Settings near 880.
BELOW_DATA_Y = 720
SETTINGS_NOTE_Y = 950
# the examples' file names: ComfyUI's template browser (frontend 1.27) shows a custom node's template by its file
# name, as the title, and as the description with '-' and '_' made spaces; it has no other title for them
LORA_PERSON_PRIOR_PRESERVATION = "LoRA of a person with prior preservation"
FULL_FINETUNE_OBJECT = "Full fine-tune of an object"
TWO_CONCEPTS = "Two concepts in one LoRA"
TRAIN_THEN_GENERATE_CORE_NODES = "Train a LoRA then generate with core nodes"
TRAIN_THEN_GENERATE_SAME_GRAPH = "Train and generate in one graph"
IMAGIC_EDIT = "Imagic edit of one photo"
TOY_WORLD_SUBJECT = "Toy world subject on a CPU in a minute"
NEGATIVE = "lowres, blurry, jpeg artifacts, deformed, watermark, text"

# the demo (demo.py) and the real-ComfyUI test address nodes of the LoRA example by these titles
TITLES = {"model": "Base model", "concept": "Concept", "data": "Data", "settings": "Settings", "train": "Train",
          "sample": "Sample", "save": "Save LoRA"}

TRAINING_NOTE = (
    "Training settings (A1111 DreamBooth guide defaults):\n"
    "- LoRA: learning_rate 1e-4 (text encoder 5e-5); full fine-tune: 1e-6.\n"
    "- lr_scheduler constant_with_warmup, a short warm-up (~100 steps).\n"
    "- steps_per_image 100-175: every image is seen that many times (epochs). Too few: the subject is not "
    "learned; too many: every prompt turns into your training photos.\n"
    "- text_encoder_ratio -1 = the concept type's preset (person 0.7, object 0.5, style 0.2).\n"
    "- mixed_precision fp16 needs a GPU; use 'no' on CPU.\n\n"
    "Re-queueing the same graph reuses the finished run (no retraining). Press Cancel to stop: a resumable "
    "checkpoint is saved and the next queue continues (resume = auto). The live panel on the Train node shows "
    "loss, learning rate, ETA and previews.")


def _concept_widgets(**changes) -> dict:
    widgets = {"instance_dir": "dreambooth/person", "instance_prompt": "a photo of ohwx person",
               "instance_token": "ohwx", "class_dir": "", "class_prompt": "a photo of a person",
               "class_token": "person", "class_negative_prompt": NEGATIVE, "num_class_images_per_image": 10,
               "class_guidance_scale": 7.5, "class_steps": 30,
               "sample_prompt": "a portrait of ohwx person, detailed, sharp focus", "concept_type": "person",
               "repeats": 1, "prior_loss_weight": 1.0}
    widgets.update(changes)
    return widgets


def _lora_settings(**changes) -> dict:
    widgets = {"use_lora": True, "lora_type": "lora", "lora_rank": 16, "lora_alpha": 16.0, "steps_per_image": 150,
               "learning_rate": 1e-4, "text_encoder_lr": 5e-5, "lr_scheduler": "constant_with_warmup",
               "lr_warmup_steps": 100, "text_encoder_ratio": -1.0, "mixed_precision": "fp16", "seed": 1234,
               "save_every_epochs": 25, "preview_every_epochs": 25, "run_name": "ohwx_person_lora"}
    widgets.update(changes)
    return widgets


def lora_training_chain(c: Canvas, x0: int = 0, y0: int = 0, *, save_widgets: dict | None = None,
                        sample: bool = True) -> dict:
    """Base model -> Concept -> Data -> Settings -> Train -> (Sample) + Save LoRA; returns {role: node id}."""
    ids = {}
    ids["model"] = c.node("LoadBaseModel", (x0, y0 + 320), title=TITLES["model"],
                          widgets={"model": BASE_MODEL, "dtype": "fp32"})
    ids["concept"] = c.node("ConceptDataset", (x0, y0 + 600), title=TITLES["concept"], widgets=_concept_widgets(),
                            width=400)
    ids["data"] = c.node("DreamBoothData", (x0 + COL, y0), title=TITLES["data"],
                         widgets={"resolution": 512, "random_flip": False})
    ids["settings"] = c.node("DreamBoothSettings", (x0 + 2 * COL, y0), title=TITLES["settings"],
                             widgets=_lora_settings())
    ids["train"] = c.node("TrainDreamBooth", (x0 + 3 * COL, y0 + 320), title=TITLES["train"], width=420, height=520)
    c.link(ids["data"], "config", ids["settings"], "config")
    c.link(ids["model"], "model", ids["train"], "model")
    c.link(ids["concept"], "concepts", ids["train"], "concepts")
    c.link(ids["settings"], "config", ids["train"], "config")
    if sample:
        ids["sample"] = c.node("SampleTrained", (x0 + 4 * COL, y0), title=TITLES["sample"], width=400, widgets={
            "prompt": "a portrait photo of ohwx person, detailed, sharp focus", "negative_prompt": NEGATIVE,
            "steps": 25, "cfg": 7.0, "seed": 42, "batch_size": 2, "scheduler": "dpmpp_2m_karras",
            "filename_prefix": "dreambooth/ohwx_person"})
        c.link(ids["train"], "model", ids["sample"], "model")
    ids["save"] = c.node("SaveLoRA", (x0 + 4 * COL, y0 + 620), title=TITLES["save"],
                         widgets=save_widgets or {"filename": PERSON_LORA, "dtype": "fp16"})
    c.link(ids["train"], "model", ids["save"], "model")
    return ids


# ----------------------------------------------------------------------------------------------------------------
def lora_person_prior_preservation() -> dict:
    c = Canvas("lora_person_prior_preservation")
    c.note("LoRA DreamBooth of a person, with prior preservation.\n\n"
           "1. Put 10-20 photos of the person (different places, light, clothes; face clearly visible) in "
           "ComfyUI/input/dreambooth/person (or type any folder in Concept > instance_dir). A same-name .txt "
           "file next to an image is its caption ([filewords]).\n"
           "2. Pick your SD 1.5 checkpoint in Base model.\n"
           "3. Queue. Class images ('a photo of a person', 10 per photo) are generated once into "
           "output/dreambooth/class_images and reused; they keep the model's idea of 'person' intact "
           "(prior preservation), so only 'ohwx person' becomes your subject.\n"
           "4. The LoRA lands in models/loras/dreambooth/ohwx_person.safetensors: use it with LoraLoader and "
           "the prompt 'a photo of ohwx person'.\n\n"
           "Headless: comfyui-dreambooth run \"LoRA of a person with prior preservation.json\" --set \"Concept.instance_dir=/my/photos\"",
           (0, -40), width=420, height=330, title="How to use")
    lora_training_chain(c, 460, 0)
    c.note(TRAINING_NOTE, (460 + 2 * COL, SETTINGS_NOTE_Y), width=420, height=330, title="Settings")
    c.group("DreamBooth LoRA (person, prior preservation)", (440, -80, 5 * COL + 20, 1400))
    return c.to_json()


def full_finetune_object() -> dict:
    c = Canvas("full_finetune_object")
    c.note("Full fine-tune of an object (or a style) -> a new checkpoint.\n\n"
           "Every weight of the UNet (and the text encoder for part of the run) trains: the strongest "
           "likeness, but a 2-4 GB file and much more VRAM than LoRA (~16-24 GB for SD 1.5 at 512 with "
           "gradient checkpointing; use AdamW8bit in Settings > optimizer when bitsandbytes is installed).\n\n"
           "1. Put 5-20 photos of the object in ComfyUI/input/dreambooth/object.\n"
           "2. Queue. The checkpoint lands in models/checkpoints/dreambooth/zwx_teapot.safetensors "
           "(fp16); load it with CheckpointLoaderSimple.\n\n"
           "For a style: set concept_type to style, instance_prompt to 'a painting in zwx style' (or "
           "[filewords] with caption files), class_token 'painting' and fewer steps_per_image (~75-100).",
           (0, -40), width=420, height=360, title="How to use")
    x0 = 460
    model = c.node("LoadBaseModel", (x0, 320), title="Base model", widgets={"model": BASE_MODEL, "dtype": "fp32"})
    concept = c.node("ConceptDataset", (x0, 600), title="Concept", width=400, widgets=_concept_widgets(
        instance_dir="dreambooth/object", instance_prompt="a photo of zwx teapot", instance_token="zwx",
        class_prompt="a photo of a teapot", class_token="teapot", num_class_images_per_image=5,
        sample_prompt="a zwx teapot on a wooden table, studio light", concept_type="object"))
    data = c.node("DreamBoothData", (x0 + COL, 0), title="Data", widgets={"resolution": 512, "random_flip": True})
    optimizer = c.node("DreamBoothOptimizer", (x0 + COL, BELOW_DATA_Y), title="Optimizer",
                       widgets={"weight_decay": 0.01, "max_grad_norm": 1.0, "use_ema": False})
    settings = c.node("DreamBoothSettings", (x0 + 2 * COL, 0), title="Settings", widgets={
        "use_lora": False, "steps_per_image": 100, "learning_rate": 1e-6, "text_encoder_lr": 1e-6,
        "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 100, "text_encoder_ratio": -1.0,
        "mixed_precision": "fp16", "seed": 1234, "save_every_epochs": 25, "preview_every_epochs": 25,
        "keep_last_checkpoints": 1, "run_name": "zwx_teapot_full"})
    train = c.node("TrainDreamBooth", (x0 + 3 * COL, 320), title="Train", width=420, height=520)
    sample = c.node("SampleTrained", (x0 + 4 * COL, 0), title="Sample", width=400, widgets={
        "prompt": "a photo of zwx teapot in a garden", "negative_prompt": NEGATIVE, "steps": 25, "seed": 7,
        "batch_size": 2, "filename_prefix": "dreambooth/zwx_teapot"})
    save = c.node("SaveCheckpoint", (x0 + 4 * COL, 620), title="Save checkpoint",
                  widgets={"filename": "dreambooth/zwx_teapot", "format": "safetensors", "dtype": "fp16"})
    c.link(data, "config", optimizer, "config")
    c.link(optimizer, "config", settings, "config")
    c.link(model, "model", train, "model")
    c.link(concept, "concepts", train, "concepts")
    c.link(settings, "config", train, "config")
    c.link(train, "model", sample, "model")
    c.link(train, "model", save, "model")
    c.note(TRAINING_NOTE.replace("- LoRA: learning_rate 1e-4 (text encoder 5e-5); full fine-tune: 1e-6.",
                                 "- Full fine-tune: learning_rate 1e-6 (LoRA would use 1e-4)."),
           (x0 + 2 * COL, SETTINGS_NOTE_Y), width=420, height=330, title="Settings")
    c.group("Full fine-tune (object)", (x0 - 20, -80, 5 * COL + 20, 1400))
    return c.to_json()


def two_concepts() -> dict:
    c = Canvas("two_concepts")
    c.note("Two concepts in one LoRA: a person (ohwx person) and a style (zkz style).\n\n"
           "Chain Concept nodes through their 'concepts' input: the second appends itself to the first. Each "
           "keeps its own folder, prompts, tokens and class images. Use a different rare token per concept.\n\n"
           "Balance: every image is seen steps_per_image times per concept; when one concept has far fewer "
           "images, raise its 'repeats' so both get a similar share of the steps (here: 15 person photos, 30 "
           "style images -> person repeats 2).\n\n"
           "After training, prompt 'a portrait of ohwx person in zkz style'.", (0, -40), width=420, height=330,
           title="How to use")
    x0 = 460
    model = c.node("LoadBaseModel", (x0, 0), title="Base model", widgets={"model": BASE_MODEL, "dtype": "fp32"})
    person = c.node("ConceptDataset", (x0, 280), title="Concept 1: person", width=400,
                    widgets=_concept_widgets(repeats=2))
    style = c.node("ConceptDataset", (x0 + COL, 280), title="Concept 2: style", width=400, widgets=_concept_widgets(
        instance_dir="dreambooth/style", instance_prompt="[filewords], zkz style", instance_token="zkz",
        class_prompt="a painting", class_token="painting", num_class_images_per_image=0,
        sample_prompt="a lighthouse at night, zkz style", concept_type="style"))
    data = c.node("DreamBoothData", (x0 + 2 * COL, -40), title="Data", widgets={"resolution": 512})
    settings = c.node("DreamBoothSettings", (x0 + 3 * COL, -40), title="Settings", widgets=_lora_settings(
        lora_rank=32, lora_alpha=16.0, steps_per_image=120, run_name="person_and_style_lora"))
    train = c.node("TrainDreamBooth", (x0 + 4 * COL, 320), title="Train", width=420, height=520)
    sample_person = c.node("SampleTrained", (x0 + 5 * COL, -40), title="Sample person", width=400, widgets={
        "prompt": "a portrait photo of ohwx person", "negative_prompt": NEGATIVE, "seed": 1,
        "filename_prefix": "dreambooth/two_concepts_person"})
    sample_both = c.node("SampleTrained", (x0 + 5 * COL, 560), title="Sample both", width=400, widgets={
        "prompt": "a portrait of ohwx person in zkz style", "negative_prompt": NEGATIVE, "seed": 2,
        "filename_prefix": "dreambooth/two_concepts_both"})
    save = c.node("SaveLoRA", (x0 + 4 * COL, 900), title="Save LoRA",
                  widgets={"filename": "dreambooth/ohwx_person_zkz_style", "dtype": "fp16"})
    c.link(person, "concepts", style, "concepts")
    c.link(data, "config", settings, "config")
    c.link(model, "model", train, "model")
    c.link(style, "concepts", train, "concepts")
    c.link(settings, "config", train, "config")
    c.link(train, "model", sample_person, "model")
    c.link(train, "model", sample_both, "model")
    c.link(train, "model", save, "model")
    c.note(TRAINING_NOTE, (x0 + 2 * COL, BELOW_DATA_Y - 40), width=420, height=330, title="Settings")
    c.group("Two concepts, one LoRA", (x0 - 20, -120, 6 * COL + 20, 1240))
    return c.to_json()


def _core_generate(c: Canvas, x0: int, y0: int, model_source: tuple, clip_source: tuple, vae_source: tuple,
                   prefix: str) -> None:
    """CLIPTextEncode x2 + EmptyLatentImage + KSampler + VAEDecode + SaveImage fed by the given outputs."""
    positive = c.node("CLIPTextEncode", (x0, y0), title="Positive prompt", width=400,
                      widgets={"text": "a photo of ohwx person on a beach at sunset, detailed, sharp focus"})
    negative = c.node("CLIPTextEncode", (x0, y0 + 220), title="Negative prompt", width=400,
                      widgets={"text": NEGATIVE})
    latent = c.node("EmptyLatentImage", (x0, y0 + 440), widgets={"width": 512, "height": 512, "batch_size": 1})
    sampler = c.node("KSampler", (x0 + COL, y0), width=320, widgets={
        "seed": 42, "steps": 25, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0})
    decode = c.node("VAEDecode", (x0 + COL, y0 + 360), width=220)
    save = c.node("SaveImage", (x0 + 2 * COL - 80, y0), width=400, height=420,
                  widgets={"filename_prefix": prefix})
    c.link(*clip_source, positive, "clip")
    c.link(*clip_source, negative, "clip")
    c.link(*model_source, sampler, "model")
    c.link(positive, "CONDITIONING", sampler, "positive")
    c.link(negative, "CONDITIONING", sampler, "negative")
    c.link(latent, "LATENT", sampler, "latent_image")
    c.link(sampler, "LATENT", decode, "samples")
    c.link(*vae_source, decode, "vae")
    c.link(decode, "IMAGE", save, "images")


def train_then_generate_core_nodes() -> dict:
    c = Canvas("train_then_generate_core_nodes")
    c.note("Train a LoRA, then generate with ComfyUI's own nodes.\n\n"
           "Top: the DreamBooth LoRA training of 'LoRA of a person with prior preservation'. Save LoRA writes "
           f"models/loras/{PERSON_LORA}.safetensors (overwrite on: the name stays stable).\n"
           "Bottom: CheckpointLoaderSimple (the same base model) + LoraLoader (that LoRA) + KSampler.\n\n"
           "First queue: training runs and saves the LoRA; the bottom group is skipped ('lora_name not in "
           "list') because the file does not exist yet. Press R (refresh), then queue again: training is not "
           "repeated (same graph -> the finished run is reused) and the images are generated.\n\n"
           "Only inside ComfyUI (the headless runner has no core nodes). To skip the save/reload, see "
           "'Train and generate in one graph' (DreamBooth To ComfyUI node).", (0, -40), width=420, height=400,
           title="How to use")
    ids = lora_training_chain(c, 460, 0, sample=False,
                              save_widgets={"filename": PERSON_LORA, "dtype": "fp16", "overwrite": True})
    c.group("1. Train and save the LoRA (this pack)", (440, -80, 5 * COL + 20, 1140))
    y0 = 1160
    ckpt = c.node("CheckpointLoaderSimple", (460, y0), title="Load checkpoint", width=360,
                  widgets={"ckpt_name": BASE_MODEL})
    lora = c.node("LoraLoader", (460, y0 + 200), title="Load the trained LoRA", width=360, widgets={
        "lora_name": PERSON_LORA + ".safetensors", "strength_model": 1.0, "strength_clip": 1.0})
    c.link(ckpt, "MODEL", lora, "model")
    c.link(ckpt, "CLIP", lora, "clip")
    _core_generate(c, 460 + COL, y0, (lora, "MODEL"), (lora, "CLIP"), (ckpt, "VAE"), "dreambooth/core_nodes")
    c.group("2. Generate with ComfyUI core nodes (queue again once the LoRA exists)",
            (440, y0 - 80, 4 * COL, 760), color="#8A8")
    del ids
    return c.to_json()


def train_then_generate_same_graph() -> dict:
    c = Canvas("train_then_generate_same_graph")
    c.note("Train, then generate with ComfyUI's KSampler in the same run, without saving and reloading.\n\n"
           "DreamBooth To ComfyUI turns the trained model (LoRA merged on a copy) into ComfyUI's MODEL, CLIP "
           "and VAE, exactly as if it had been saved and loaded with CheckpointLoaderSimple. Anything that takes "
           "MODEL/CLIP works from there: other LoRAs, ControlNet, upscalers, your usual samplers.\n\n"
           "Save LoRA is kept so the result is not lost; remove it if you only want images.\n"
           "Only inside ComfyUI (MODEL/CLIP/VAE are ComfyUI objects).", (0, -40), width=420, height=330,
           title="How to use")
    ids = lora_training_chain(c, 460, 0, sample=False)
    c.group("1. Train (this pack)", (440, -80, 5 * COL + 20, 1140))
    y0 = 1160
    convert = c.node("DreamBoothToComfy", (460, y0), title="To ComfyUI", width=360, widgets={"dtype": "fp16"})
    c.link(ids["train"], "model", convert, "model")
    _core_generate(c, 460 + COL, y0, (convert, "model"), (convert, "clip"), (convert, "vae"),
                   "dreambooth/same_graph")
    c.group("2. Generate with ComfyUI core nodes", (440, y0 - 80, 4 * COL, 760), color="#8A8")
    return c.to_json()


def imagic_edit() -> dict:
    c = Canvas("imagic_edit")
    c.note("Imagic: edit one real photo by a text (Kawar et al. 2023; the A1111 extension's 'Train Imagic Only').\n\n"
           "1. Put ONE photo in ComfyUI/input/dreambooth/imagic (exactly one image: the run refuses 0 or 2+).\n"
           "2. Write the edit as Concept > instance_prompt, describing the photo as you want it: 'a photo of a "
           "sitting dog' for a standing one.\n"
           "3. Queue. Stage 1 optimises that text's embedding towards the photo (1000 steps), stage 2 fine-tunes "
           "the UNet on it (1500 steps); both show loss and previews on the Train node, Cancel resumes.\n"
           "4. The three Sample nodes show imagic_alpha 0 (the photo rebuilt), 0.7 (the edit, keeping the photo) "
           "and 1 (the text alone). Try 0.6-0.9, or above 1 for a stronger edit; the prompt is not used.\n\n"
           "Full fine-tune as in the paper (Settings use_lora off; the Imagic node's imagic_unet_lr auto = 5e-7). "
           "steps_per_image and the epoch settings do not apply to Imagic.", (0, -40), width=420, height=400,
           title="How to use")
    x0 = 460
    model = c.node("LoadBaseModel", (x0, 320), title="Base model", widgets={"model": BASE_MODEL, "dtype": "fp32"})
    concept = c.node("ConceptDataset", (x0, 600), title="Concept", width=400, widgets=_concept_widgets(
        instance_dir="dreambooth/imagic", instance_prompt="a photo of a sitting dog", instance_token="",
        class_prompt="", class_token="", class_negative_prompt="", num_class_images_per_image=0,
        sample_prompt="", concept_type="object"))
    data = c.node("DreamBoothData", (x0 + COL, 0), title="Data", widgets={"resolution": 512, "random_flip": False})
    settings = c.node("DreamBoothSettings", (x0 + 2 * COL, 0), title="Settings", widgets={
        "use_lora": False, "steps_per_image": 150, "learning_rate": 1e-6, "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 0, "text_encoder_ratio": 0.0, "mixed_precision": "fp16", "seed": 1234,
        "save_every_epochs": 1, "preview_every_epochs": 1, "keep_last_checkpoints": 1, "run_name": "imagic_edit"})
    imagic = c.node("DreamBoothImagic", (x0 + COL, BELOW_DATA_Y), title="Imagic", widgets={
        "train_imagic_only": True, "imagic_embed_steps": 1000, "imagic_embed_lr": 1e-3, "imagic_unet_steps": 1500,
        "imagic_unet_lr": 0.0})
    train = c.node("TrainDreamBooth", (x0 + 3 * COL, 320), title="Train", width=420, height=520)
    c.link(data, "config", imagic, "config")
    c.link(imagic, "config", settings, "config")
    c.link(model, "model", train, "model")
    c.link(concept, "concepts", train, "concepts")
    c.link(settings, "config", train, "config")
    for i, alpha in enumerate((0.0, 0.7, 1.0)):
        sample = c.node("SampleTrained", (x0 + 4 * COL, i * 600), title=f"Sample alpha {alpha:g}", width=400,
                        widgets={"prompt": "", "negative_prompt": NEGATIVE, "steps": 50, "cfg": 7.5, "seed": 7,
                                 "scheduler": "ddim", "filename_prefix": f"dreambooth/imagic_alpha{alpha:g}",
                                 "imagic_alpha": alpha})
        c.link(train, "model", sample, "model")
    c.group("Imagic: edit one photo by a text", (x0 - 20, -80, 5 * COL + 20, 1880))
    return c.to_json()


def toy_world_subject() -> dict:
    """The toy world's DreamBooth (issue 19): the shipped toy base learns a subject in about a minute on a CPU.
    Its settings are the toy benchmark's full fine-tune row (training/toyworld/dreambench.FULL, the row that learns
    the subject there), so the example shows what bench/quality.py measures."""
    from comfyui_dreambooth.nodes.models import TOY_BASE
    from comfyui_dreambooth.training.toyworld import dreambench as db
    from comfyui_dreambooth.training.toyworld.world import CLASS_NOUN, instance_prompt

    v = db.FULL
    token = db.TOKEN
    c = Canvas("toy_world_subject")
    c.note("DreamBooth you can watch work in a minute, without a real model or a GPU.\n\n"
           "The base is the pack's toy world model (64 px): it knows coloured toys ('a red circle toy on a blue "
           "background') but not this subject, a red/blue split circle, which no words of its world can name. "
           "Concept > instance_dir 'toyworld:split_circle' draws its 5 pictures into input/toyworld/split_circle "
           "(other subjects: striped_square, dotted_heart, purple_plus, dotted_star; or any folder of 64 px "
           "pictures).\n\nQueue: a full fine-tune of the UNet (text encoder frozen, as in diffusers' DreamBooth "
           "script) trains for about half a minute on a CPU, then the samples show "
           f"'{instance_prompt(token)}' (the subject) and '{instance_prompt(token, 'blue')}' (the subject in a "
           f"new scene). '{db.CLASS_PROMPT}' shows what the model now thinks any toy is: without prior "
           "preservation it drifts towards the subject (set num_class_images_per_image to keep it; at this "
           "short run that also slows the subject down).\n\n"
           "bench/quality.py measures these same settings (README: Toy world).",
           (0, -40), width=420, height=380, title="How to use")
    x0 = 460
    model = c.node("LoadBaseModel", (x0, 320), title=TITLES["model"], widgets={"model": TOY_BASE, "dtype": "fp32"})
    concept = c.node("ConceptDataset", (x0, 600), title=TITLES["concept"], width=400, widgets=_concept_widgets(
        instance_dir="toyworld:split_circle", instance_prompt=instance_prompt(token), instance_token=token,
        class_prompt=db.CLASS_PROMPT, class_token=CLASS_NOUN, class_negative_prompt="",
        num_class_images_per_image=0 if v.prior != "class_images" else v.class_images_per_image,
        class_guidance_scale=db.SAMPLE_CFG, class_steps=db.SAMPLE_STEPS, sample_prompt=instance_prompt(token),
        concept_type="object"))
    data = c.node("DreamBoothData", (x0 + COL, 0), title=TITLES["data"],
                  widgets={"resolution": 64, "bucketing": False, "random_flip": False, "cache_mode": "memory"})
    settings = c.node("DreamBoothSettings", (x0 + 2 * COL, 0), title=TITLES["settings"], widgets=_lora_settings(
        use_lora=v.use_lora, lora_rank=v.lora_rank, lora_alpha=float(v.lora_rank), steps_per_image=0,
        max_train_steps=v.steps, batch_size=v.batch_size, learning_rate=v.learning_rate,
        text_encoder_lr=v.text_encoder_lr or 0.0, lr_scheduler="constant", lr_warmup_steps=0,
        text_encoder_ratio=1.0 if v.text_encoder else 0.0, mixed_precision="no", seed=0, save_every_epochs=0,
        preview_every_epochs=0, run_name="toy_split_circle"))
    train = c.node("TrainDreamBooth", (x0 + 3 * COL, 320), title=TITLES["train"], width=420, height=520)
    c.link(data, "config", settings, "config")
    c.link(model, "model", train, "model")
    c.link(concept, "concepts", train, "concepts")
    c.link(settings, "config", train, "config")
    prompts = [("Subject", instance_prompt(token)), ("New scene", instance_prompt(token, "blue")),
               ("Class (prior)", db.CLASS_PROMPT)]
    for row, (title, prompt) in enumerate(prompts):
        sample = c.node("SampleTrained", (x0 + 4 * COL, row * 600), title=title, width=400, widgets={
            "prompt": prompt, "negative_prompt": "", "steps": db.SAMPLE_STEPS, "cfg": db.SAMPLE_CFG, "seed": 1000,
            "width": 64, "height": 64, "batch_size": 4, "scheduler": db.SAMPLER,
            "filename_prefix": f"dreambooth/toy_{title.split()[0].lower()}"})
        c.link(train, "model", sample, "model")
    save = c.node("SaveCheckpoint", (x0 + 3 * COL, 900), title="Save checkpoint",
                  widgets={"filename": "dreambooth/toy_split_circle", "dtype": "fp16"})
    c.link(train, "model", save, "model")
    c.group("DreamBooth in the toy world (full fine-tune, CPU, ~1 min)", (440, -80, 5 * COL + 20, 1900))
    return c.to_json()


EXAMPLES = {
    LORA_PERSON_PRIOR_PRESERVATION: lora_person_prior_preservation,
    FULL_FINETUNE_OBJECT: full_finetune_object,
    TWO_CONCEPTS: two_concepts,
    TRAIN_THEN_GENERATE_CORE_NODES: train_then_generate_core_nodes,
    TRAIN_THEN_GENERATE_SAME_GRAPH: train_then_generate_same_graph,
    IMAGIC_EDIT: imagic_edit,
    TOY_WORLD_SUBJECT: toy_world_subject,
}


def render(workflow: dict) -> str:
    return json.dumps(workflow, indent=1) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    os.makedirs(EXAMPLES_DIR, exist_ok=True)
    stale = []
    for name, build in EXAMPLES.items():
        path = os.path.join(EXAMPLES_DIR, name + ".json")
        text = render(build())
        if check:
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    stale.append(path)
            continue
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        print(path)
    for path in stale:
        print(f"out of date: {path} (run tests/make_example_workflows.py)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
