"""The toy world (README "Toy world"): a vocabulary of flat toys, a small pretrained base that knows it, an evaluator
that reads generated images back, and DreamBench in miniature on top of the pack's own trainer and sampler.

world.py      the contract: vocabulary, rendering, captions, subjects the vocabulary cannot name
masked.py     subject images with exact masks (OneTrainer's <name>-masklabel.png), for masked-loss runs
evaluate.py   reads an image: background, colour(s), shape, and whether it shows a subject
pretrain.py   makes the toy base (python -m comfyui_dreambooth.training.toyworld.pretrain)
dreambench.py trains a subject with the pack's trainer and measures it (bench/quality.py, the guard tests, demo)
commands.py   `comfyui-dreambooth toyworld base|draw`
"""
