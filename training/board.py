"""TensorBoard event files for a run (optional: the `tensorboard` package, `pip install comfyui-dreambooth[tensorboard]`).

The run folder is the log directory, so one run (one run id, continued after a resume) is one TensorBoard run;
open it with `tensorboard --logdir <output>/dreambooth`. A resumed run drops the events after its checkpoint's step
(purge_step), as loss.jsonl and validation.jsonl do. Tags (a stable contract, listed in the README):

    train/loss                 the step's loss
    train/lr/group_<i>         the learning rate of optimizer parameter group i (0 = UNet, then text encoders)
    train/it_per_s             optimizer steps per second
    validation/loss            the subject loss averaged over the timestep bands
    validation/loss_<band>     the subject loss at one band's timestep (low, mid, high)
    validation/prior_drift     the prior drift (all prompts); validation/prior_drift_class, _neutral
    validation/grid            the validation grid image (base column | trained column)
"""
from __future__ import annotations

from .validation import TIMESTEP_BANDS


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def open_board(log_dir: str, start_step: int = 0) -> "Board":
    from torch.utils.tensorboard import SummaryWriter

    # a resumed run logs again from the step after its checkpoint (the checkpoint's own validation is kept)
    return Board(SummaryWriter(log_dir=log_dir, purge_step=start_step + 1 if start_step else None))


class Board:
    """What the step loop and validation write; each call flushes nothing itself (the writer does, every 2 min
    and at close)."""

    def __init__(self, writer):
        self.writer = writer

    def step(self, step: int, loss: float, lrs, it_per_s) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        for i, lr in enumerate(lrs):
            self.writer.add_scalar(f"train/lr/group_{i}", lr, step)
        if it_per_s:
            self.writer.add_scalar("train/it_per_s", it_per_s, step)

    def validation(self, record: dict) -> None:
        step = record["step"]
        names = ["loss", *(f"loss_{band}" for band, _ in TIMESTEP_BANDS), "prior_drift", "prior_drift_class",
                 "prior_drift_neutral"]
        for name in names:
            if name in record:
                self.writer.add_scalar(f"validation/{name}", record[name], step)
        if record.get("grid"):
            import numpy as np
            from PIL import Image

            with Image.open(record["grid"]) as image:
                self.writer.add_image("validation/grid", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


__all__ = ["available", "open_board", "Board"]
