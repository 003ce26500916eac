"""ComfyUI node classes (thin adapters over `training/`), collected into one mapping.

Every node function runs inside `training.quiet.quiet_libraries()`: the console shows the pack's own lines, not
diffusers / transformers notices, FutureWarnings and progress bars, and the libraries are as they were once the
node returns (the user's other nodes are not affected).
"""
import inspect

from ..training.quiet import run_quietly
from . import concepts, convert, models, save, settings, train, wizard
from .live_routes import register_routes

NODE_CLASS_MAPPINGS = {
    "LoadBaseModel": models.LoadBaseModel,
    "SampleTrained": models.SampleTrained,
    "LoadTrained": models.LoadTrained,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadBaseModel": "DreamBooth Load Base Model",
    "SampleTrained": "DreamBooth Sample",
    "LoadTrained": "DreamBooth Load Trained",
}
for _module in (concepts, settings, wizard, train, save, convert):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
for _cls in NODE_CLASS_MAPPINGS.values():
    _raw = inspect.getattr_static(_cls, _cls.FUNCTION)
    if isinstance(_raw, (classmethod, staticmethod)):
        setattr(_cls, _cls.FUNCTION, type(_raw)(run_quietly(_raw.__func__)))
    else:
        setattr(_cls, _cls.FUNCTION, run_quietly(_raw))

# the live panel's /dreambooth/state and /dreambooth/control routes (no-op outside ComfyUI); ComfyUI adds the
# route table to its web app after loading custom nodes, so this must happen at import time
register_routes()
