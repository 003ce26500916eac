"""Exponential moving average of a module's trainable parameters.

Our own small class rather than diffusers' EMAModel because the average may live on the CPU while the model
trains on the GPU (`ema_on_cpu`), and because it is keyed by parameter name, so a resumed run can check that
the state belongs to the same set of weights.

Update after optimizer step n (1-based), as diffusers' EMAModel does by default:
    d_n = min(decay, (1 + k) / (10 + k)) with k = n - 1      (0.1, 0.18, 0.25, ... then capped at decay)
    ema <- d_n * ema + (1 - d_n) * param
The ramp keeps the average from being dominated by the untrained start in short runs.
"""
from __future__ import annotations

import contextlib
import copy

from ..devices import to_host


def _trainable(module) -> dict:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


class EMA:
    """EMA of `module`'s trainable parameters (those with requires_grad when the EMA is created)."""

    def __init__(self, module, decay: float = 0.9999, *, on_cpu: bool = False):
        import torch

        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay = {decay} must be in [0, 1)")
        params = _trainable(module)
        if not params:
            raise ValueError("EMA: the module has no trainable parameters (requires_grad=False everywhere)")
        self.decay = decay
        self.num_updates = 0
        self.on_cpu = on_cpu
        with torch.no_grad():
            # fp32 shadow: (1 - decay) * delta underflows in half precision for decay near 1
            self.shadow = {name: p.detach().to(device="cpu" if on_cpu else p.device, dtype=torch.float32,
                                                copy=True)
                           for name, p in params.items()}
        if on_cpu:                      # (the memory accounting books its fake CPU copies as the host's)
            for t in self.shadow.values():
                to_host(t)

    def current_decay(self) -> float:
        """The decay the next update will use."""
        k = self.num_updates
        return min(self.decay, (1.0 + k) / (10.0 + k))

    def step(self, module) -> None:
        """Fold the module's current weights into the average (call after each optimizer step)."""
        import torch

        params = _trainable(module)
        self._check_names(params.keys(), "step")
        weight = 1.0 - self.current_decay()
        with torch.no_grad():
            shadows = [self.shadow[name] for name in params]
            currents = [p.detach().to(device=s.device, dtype=s.dtype) for p, s in zip(params.values(), shadows)]
            torch._foreach_lerp_(shadows, currents, weight)
        self.num_updates += 1

    def _check_names(self, names, what: str) -> None:
        names = set(names)
        if names != set(self.shadow):
            missing = sorted(set(self.shadow) - names)[:5]
            extra = sorted(names - set(self.shadow))[:5]
            raise ValueError(f"EMA {what}: the trainable parameters differ from the EMA's (missing {missing}, "
                             f"new {extra}); the EMA must be created after choosing what trains")

    def copy_to(self, module) -> None:
        """Write the averaged weights into `module` (in place; use on a copy you own)."""
        import torch

        named = dict(module.named_parameters())
        absent = sorted(set(self.shadow) - set(named))
        if absent:
            raise ValueError(f"EMA copy_to: the module lacks parameters {absent[:5]}")
        with torch.no_grad():
            for name, s in self.shadow.items():
                named[name].copy_(s)

    def averaged_copy(self, module):
        """A deep copy of `module` carrying the averaged weights (e.g. SDModel.ema_unet)."""
        clone = copy.deepcopy(module)
        self.copy_to(clone)
        return clone

    @contextlib.contextmanager
    def applied_to(self, module):
        """Temporarily load the averaged weights into `module` (e.g. for a preview), restoring them after."""
        import torch

        named = dict(module.named_parameters())
        with torch.no_grad():
            saved = {name: named[name].detach().to("cpu", copy=True) for name in self.shadow}
        try:
            self.copy_to(module)
            yield module
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    named[name].copy_(value)

    def to(self, device) -> "EMA":
        self.shadow = {name: s.to(device) for name, s in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {name: s.detach().clone() for name, s in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved EMA (resume). The parameter names must match; tensors keep this EMA's device."""
        import torch

        self._check_names(state["shadow"].keys(), "load_state_dict")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        with torch.no_grad():
            for name, value in state["shadow"].items():
                if value.shape != self.shadow[name].shape:
                    raise ValueError(f"EMA load_state_dict: {name} has shape {tuple(value.shape)}, expected "
                                     f"{tuple(self.shadow[name].shape)}")
                self.shadow[name].copy_(value)


__all__ = ["EMA"]
