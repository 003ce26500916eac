"""ComfyUI node classes (thin adapters over `training/`), collected into one mapping."""
from . import concepts, models, save, settings

_MODULES = (models, concepts, settings, save)

NODE_CLASS_MAPPINGS = {
    "LoadBaseModel": models.LoadBaseModel,
    "SampleTrained": models.SampleTrained,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadBaseModel": "DreamBooth Load Base Model",
    "SampleTrained": "DreamBooth Sample",
}
for _module in _MODULES[1:]:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
