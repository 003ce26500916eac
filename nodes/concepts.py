"""ConceptDataset: one concept (instance images, prompts, class images) on the CONCEPTS socket.

Cheap by design: it resolves folders, validates the settings and scans the folders (counts, broken files,
duplicates, class images present/missing, long captions) for its report. Nothing is encoded here; class
images are generated and latents cached by the training node, which has the model.
"""
from __future__ import annotations

import hashlib
import os
import re

from ..training.data.settings import CONCEPT_TYPES, ConceptSettings
from . import comfy_compat as compat
from .paths import check_path, path_allowed, typed_path

_TOKEN_RULES = (
    "Token handling (as in the A1111 DreamBooth extension): with instance_token 'sks' and class_token 'dog', "
    "an instance caption that names the class gets the token before it ('a dog on grass' -> 'a sks dog on "
    "grass'); one naming neither gets 'sks dog, ' prepended; one already holding 'sks' is kept. Class-image "
    "captions never hold the instance token: it is replaced by the class token, and the class token is "
    "prepended when absent."
)

_DEFAULTS = ConceptSettings()


def _string(default: str, tooltip: str, multiline: bool = False):
    return ("STRING", {"default": default, "multiline": multiline, "tooltip": tooltip})


class ConceptDataset:
    DESCRIPTION = ("One DreamBooth concept: a folder of images of the subject, how they are captioned, and "
                   "optional prior-preservation class images. Chain several with the 'concepts' input. "
                   + _TOKEN_RULES)
    RETURN_TYPES = ("CONCEPTS", "STRING")
    RETURN_NAMES = ("concepts", "report")
    OUTPUT_TOOLTIPS = ("The incoming concepts (if any) followed by this one.",
                       "What was found in the folders: images, captions, broken files, duplicates, class images.")
    FUNCTION = "build"
    CATEGORY = "DreamBooth/data"
    OUTPUT_NODE = True   # queue it alone to see the report while preparing a dataset

    @classmethod
    def INPUT_TYPES(cls):
        d = _DEFAULTS
        return {
            "required": {
                "instance_dir": _string("", "Folder of images of your subject. Absolute, or relative to ComfyUI's "
                                            "input folder. PNG/JPEG/WebP/BMP/TIFF; a same-name .txt or .caption "
                                            "file is that image's caption ([filewords]). 'toyworld:split_circle' "
                                            "(or another toy-world subject) draws that subject's 5 images into "
                                            "input/toyworld/ for the toy base."),
                "instance_prompt": _string(d.instance_prompt, "Caption for the instance images. [filewords] is "
                                                              "replaced by each image's caption file, or its file "
                                                              "name. " + _TOKEN_RULES),
                "instance_token": _string(d.instance_token, "A rare word that will mean your subject, e.g. 'sks' "
                                                            "or 'ohwx'. Inserted before the class word or "
                                                            "prepended; see the node description."),
                "class_dir": _string(d.class_dir, "Folder for class (regularisation) images. Missing images are "
                                                  "generated there by the training node; existing ones are reused. "
                                                  "Empty = a folder under the output directory named after the "
                                                  "class prompt."),
                "class_prompt": _string(d.class_prompt, "Prompt for class images, e.g. 'photo of a dog'. May hold "
                                                        "[filewords]: then each instance image's caption (with the "
                                                        "instance token replaced by the class token) is used."),
                "class_token": _string(d.class_token, "The general word for your subject, e.g. 'dog', 'man', "
                                                      "'woman'. Used to place the instance token and to caption "
                                                      "class images."),
                "class_negative_prompt": _string(d.class_negative_prompt,
                                                 "Negative prompt when generating class images."),
                "num_class_images_per_image": ("INT", {"default": d.num_class_images_per_image, "min": 0,
                                                       "max": 1000, "tooltip": "Class images per instance image "
                                                       "for prior preservation (the A1111 guide suggests ~10 for "
                                                       "people). 0 turns prior preservation off."}),
                "class_guidance_scale": ("FLOAT", {"default": d.class_guidance_scale, "min": 1.0, "max": 30.0,
                                                   "step": 0.5, "tooltip": "CFG scale for class-image generation."}),
                "class_steps": ("INT", {"default": d.class_steps, "min": 1, "max": 500,
                                        "tooltip": "Sampler steps per class image."}),
                "sample_prompt": _string(d.sample_prompt, "Prompt for preview images during training. Empty = the "
                                                          "instance prompt of the first image."),
                "concept_type": (list(CONCEPT_TYPES), {"default": d.concept_type,
                                                       "tooltip": "Presets from the A1111 guide: person (text "
                                                       "encoder trained 70% of the steps, ~100 steps per image), "
                                                       "object (50%, ~80), style (20%, ~75)."}),
                "repeats": ("INT", {"default": d.repeats, "min": 1, "max": 10000,
                                    "tooltip": "How often each instance image is seen per epoch. Use it to "
                                               "balance concepts with different image counts."}),
                "prior_loss_weight": ("FLOAT", {"default": d.prior_loss_weight, "min": 0.0, "max": 100.0,
                                                "step": 0.05, "tooltip": "Weight of the class-image loss "
                                                "relative to the instance loss (1.0 in the DreamBooth paper)."}),
                "mask_dir": _string(d.mask_dir, "Masked loss (masked_loss on DreamBooth Advanced): a folder of masks "
                                                "named like the instance images (kohya's layout; white = subject, "
                                                "black = background). Empty = masks from '<name>-masklabel.png' "
                                                "beside each image (OneTrainer's layout) or the image's alpha "
                                                "channel."),
            },
            "optional": {
                "concepts": ("CONCEPTS", {"tooltip": "Concepts from another DreamBooth Concept node; this one "
                                                     "is appended after them."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, instance_dir="", class_dir="", mask_dir="", **kwargs):
        """Re-run when the folders' contents change, not only when the widgets do."""
        h = hashlib.sha256()
        for folder in (instance_dir, class_dir, mask_dir):
            path = resolve_folder(folder) if folder else ""
            h.update(path.encode())
            if path and path_allowed(path) and os.path.isdir(path):     # a refused folder is not even listed
                for name in sorted(os.listdir(path)):
                    try:
                        st = os.stat(os.path.join(path, name))
                    except OSError:
                        continue
                    h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def build(self, instance_dir, instance_prompt, instance_token, class_dir, class_prompt, class_token,
              class_negative_prompt, num_class_images_per_image, class_guidance_scale, class_steps,
              sample_prompt, concept_type, repeats, prior_loss_weight, mask_dir="", concepts=None):
        concept = make_concept(
            instance_dir=instance_dir, instance_prompt=instance_prompt, instance_token=instance_token,
            class_dir=class_dir, class_prompt=class_prompt, class_token=class_token,
            class_negative_prompt=class_negative_prompt, num_class_images_per_image=num_class_images_per_image,
            class_guidance_scale=class_guidance_scale, class_steps=class_steps, sample_prompt=sample_prompt,
            concept_type=concept_type, repeats=repeats, prior_loss_weight=prior_loss_weight, mask_dir=mask_dir)
        chain = list(concepts or []) + [concept]    # a new list: upstream outputs are cached and shared
        from ..training.data.report import scan_report

        scanned = scan_report(chain)
        for line in scanned.notices(concepts=[len(chain) - 1]):   # upstream concept nodes printed their own
            compat.log(line)
        report = scanned.report_text()
        return {"ui": {"text": [report]}, "result": (chain, report)}


def resolve_folder(path: str) -> str:
    """An absolute folder path. Relative paths are looked up in ComfyUI's input folder first (where users
    put their data), then the current directory; a relative path found in neither lands in the input folder.
    Environment variables are never expanded; `~` only headless (see nodes/paths.py)."""
    from ..training.toyworld.commands import subject_name
    from .comfy_compat import input_directory

    toy = subject_name(path or "")
    if toy:                                  # "toyworld:NAME": the toy example's drawn subject, in the input folder
        return os.path.join(input_directory(), "toyworld", toy)
    path = typed_path(path)
    if not path or os.path.isabs(path):
        return path

    in_input = os.path.join(input_directory(), path)
    if os.path.isdir(in_input):
        return os.path.abspath(in_input)
    if os.path.isdir(path):
        return os.path.abspath(path)
    return os.path.abspath(in_input)


def default_class_dir(class_prompt: str, class_token: str) -> str:
    from .comfy_compat import output_directory

    words = re.sub(r"[^a-z0-9]+", "_", (class_prompt or class_token or "class").lower()).strip("_")[:60]
    return os.path.join(output_directory(), "dreambooth", "class_images", words or "class")


def make_concept(**widgets) -> ConceptSettings:
    """Widgets -> validated ConceptSettings with resolved folders; raises ValueError listing every problem.
    An instance_dir "toyworld:NAME" draws that toy-world subject's images into input/toyworld/NAME first."""
    from ..training.toyworld.commands import subject_folder, subject_name

    concept = ConceptSettings.from_dict(widgets, strict=True)
    changes = {"instance_dir": resolve_folder(concept.instance_dir)}
    if concept.class_dir.strip():
        changes["class_dir"] = resolve_folder(concept.class_dir)
    elif concept.uses_prior_preservation:
        changes["class_dir"] = default_class_dir(concept.class_prompt, concept.class_token)
    # the folder check comes before anything looks at the folders (not even whether they exist)
    if changes["instance_dir"]:
        check_path(changes["instance_dir"], "ConceptDataset instance_dir")
        toy = subject_name(concept.instance_dir)
        if toy:
            from .comfy_compat import input_directory

            check_path(changes["instance_dir"], "ConceptDataset instance_dir", write=True)
            subject_folder(toy, input_directory())
    if changes.get("class_dir") and concept.uses_prior_preservation:     # missing class images are written there
        check_path(changes["class_dir"], "ConceptDataset class_dir", write=True)
    if concept.mask_dir.strip():
        changes["mask_dir"] = resolve_folder(concept.mask_dir)
        check_path(changes["mask_dir"], "ConceptDataset mask_dir")
    concept = concept.replace(**changes)
    problems = concept.validate()
    if problems:
        raise ValueError("DreamBooth Concept: " + "; ".join(problems))
    return concept


NODE_CLASS_MAPPINGS = {"ConceptDataset": ConceptDataset}
NODE_DISPLAY_NAME_MAPPINGS = {"ConceptDataset": "DreamBooth Concept"}

__all__ = ["ConceptDataset", "resolve_folder", "make_concept", "default_class_dir", "NODE_CLASS_MAPPINGS",
           "NODE_DISPLAY_NAME_MAPPINGS"]
