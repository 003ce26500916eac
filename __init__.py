"""comfyui-dreambooth: DreamBooth training (full fine-tune and LoRA) as ComfyUI nodes.

ComfyUI imports this file at start-up: it stays cheap (no torch, diffusers or model code is imported here;
node modules import the heavy libraries inside their functions).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"
__version__ = "0.1.0"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
