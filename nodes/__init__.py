"""ComfyUI node classes (thin adapters over `training/`), collected into one mapping."""
from . import concepts, convert, models, save, settings, train
from .live import register_routes

NODE_CLASS_MAPPINGS = {
    "LoadBaseModel": models.LoadBaseModel,
    "SampleTrained": models.SampleTrained,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadBaseModel": "DreamBooth Load Base Model",
    "SampleTrained": "DreamBooth Sample",
}
for _module in (concepts, settings, train, save, convert):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

# the live panel's /dreambooth/state and /dreambooth/control routes (no-op outside ComfyUI); ComfyUI adds the
# route table to its web app after loading custom nodes, so this must happen at import time
register_routes()
