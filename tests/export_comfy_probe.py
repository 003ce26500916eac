"""Load a kohya LoRA with a real ComfyUI's own code; run with ComfyUI's Python (see test_export_lora.py).

usage: python export_comfy_probe.py COMFYUI_DIR REQUEST.json

REQUEST: {"checkpoint": single-file checkpoint of the base model (ComfyUI detects the UNet layout from it),
          "clip": {"clip_l": n_layers, "clip_g": n_layers} (ComfyUI's names for the text encoders),
          "lora": the LoRA file, "base_weights": {kohya name: base weight} (.safetensors),
          "out": where to write {kohya name: weight after ComfyUI applied the LoRA at strength 1} (.safetensors)}
Prints one JSON line: {"patches": n, "not_loaded": [keys], "mapped_prefixes": [names]}.
"""
import json
import logging
import sys
from types import SimpleNamespace


def main(comfy_dir: str, request_path: str) -> None:
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_detection
    import comfy.utils
    from safetensors.torch import save_file

    with open(request_path) as f:
        request = json.load(f)

    class Stub:
        """The two things model_lora_keys_* read from a model: its state-dict keys and its UNet config."""

        def __init__(self, keys, unet_config=None):
            self._keys = keys
            self.model_config = SimpleNamespace(unet_config=unet_config)

        def state_dict(self):
            return dict.fromkeys(self._keys)

    checkpoint = comfy.utils.load_torch_file(request["checkpoint"], safe_load=True)
    unet_config = comfy.model_detection.detect_unet_config(checkpoint, "model.diffusion_model.")
    key_map = {}
    comfy.lora.model_lora_keys_unet(Stub([], unet_config), key_map)
    clip_keys = [f"{encoder}.transformer.text_model.encoder.layers.{i}.{layer}.weight"
                 for encoder, layers in request["clip"].items() for i in range(layers)
                 for layer in comfy.lora.LORA_CLIP_MAP]
    comfy.lora.model_lora_keys_clip(Stub(clip_keys), key_map)

    lora = comfy.utils.load_torch_file(request["lora"], safe_load=True)
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logging.getLogger().addHandler(handler)
    patches = comfy.lora.load_lora(lora, key_map)
    logging.getLogger().removeHandler(handler)
    not_loaded = [m.split(": ", 1)[1] for m in messages if m.startswith("lora key not loaded")]

    base = comfy.utils.load_torch_file(request["base_weights"], safe_load=True)
    adapters = comfy.lora.load_lora(lora, {name: name for name in base}, log_missing=False)
    applied = {}
    for name, adapter in adapters.items():
        weight = base[name].clone().float()
        applied[name] = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], weight, name).contiguous()
    save_file(applied, request["out"])
    prefixes = sorted({key.split(".")[0] for key in lora} & set(key_map))
    print(json.dumps({"patches": len(patches), "not_loaded": not_loaded, "mapped_prefixes": prefixes}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
