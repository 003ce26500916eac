"""Per-parameter optimizer steps: `fused_backward` and `weights_dtype = bf16` (stochastic rounding).

`build_training_optimizer` returns the plain optimizer of `optimizers.build_optimizer` unless one of these two
settings asks for more; then it returns a `PerParameterOptimizer`:

- one optimizer of the chosen kind per trained tensor (same class, same hyper-parameters, the tensor's group
  learning rate). For element-wise optimizers (AdamW, SGD, Lion, AdamW8bit, Adafactor's per-tensor factored
  moments) this is the same algorithm as one optimizer over all tensors: on the CPU AdamW / SGD give
  bit-identical weights (tests/test_memory_engine.py). Prodigy shares one step-size estimate over all weights,
  so it is refused (settings validation).
- fused_backward: each tensor is stepped inside the backward pass by a `register_post_accumulate_grad_hook` and
  its gradient freed at once, so at no time does a full set of gradients exist (the memory of one copy of the
  trained weights). `step()` then only counts the step. Gradient accumulation and global-norm clipping need
  every gradient before any step, so validation refuses them with fused_backward, and fp16 loss scaling too.
- bf16 weights: the update is computed in fp32 (the tensor and its gradient are upcast for the step, one tensor
  at a time) and written back with stochastic rounding (`stochastic_round_to_bf16`), so updates far below bf16's
  resolution still move the weights on average. The random bits come from a generator seeded by (seed, step,
  tensor index): a resumed run rounds exactly as the uninterrupted one.

The object is a torch Optimizer (LR schedulers and accelerate accept it): its `param_groups` are the
per-tensor optimizers' own groups, so the LR scheduler's changes reach them; `state_dict()` / `load_state_dict()`
hold every per-tensor state and the step count.
"""
from __future__ import annotations

import hashlib

import torch

from .optimizers import build_optimizer, normalise_groups

BF16_MASK = -65536          # 0xFFFF0000 as int32: the bits a bf16 keeps of an fp32


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None, *,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 `x` -> bf16, rounding up or down at random with the probability of the distance: add 16 uniform
    random bits below bf16's mantissa to the fp32 bit pattern, then truncate. E[result] = x. With `out` (a bf16
    tensor of x's shape) the result is written there; the bits are summed and truncated in the noise's own tensor,
    so one int32 temporary is all this makes (the truncated fp32 converts to bf16 exactly)."""
    x = x.detach().to(torch.float32).contiguous()
    bits = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits.add_(x.view(torch.int32)).bitwise_and_(BF16_MASK)
    if out is None:
        return bits.view(torch.float32).to(torch.bfloat16)
    return out.copy_(bits.view(torch.float32))


def _seed(seed: int, step: int, index: int) -> int:
    digest = hashlib.sha256(f"sr:{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def needs_per_parameter(settings) -> bool:
    return bool(getattr(settings, "fused_backward", False)) or getattr(settings, "weights_dtype", "fp32") == "bf16"


class PerParameterOptimizer(torch.optim.Optimizer):
    """One optimizer per trained tensor; see the module docstring."""

    def __init__(self, param_groups, settings, *, fused: bool, seed: int = 0):
        self._optimizers: list = []
        self._by_param: dict[int, tuple[int, object]] = {}
        for group in normalise_groups(param_groups):
            for p in group["params"]:
                single = {**group, "params": [p]}
                opt = build_optimizer([single], settings)
                self._by_param[id(p)] = (len(self._optimizers), opt)
                self._optimizers.append(opt)
        self._params = [opt.param_groups[0]["params"][0] for opt in self._optimizers]
        self.fused = fused
        self.seed = int(seed)
        self.steps_done = 0
        self._hooks = []
        # Optimizer.__init__ sets up the hook tables; a placeholder tensor stands for the parameters, which live
        # in the per-tensor optimizers (param_groups below reads them from there)
        super().__init__([torch.zeros(1, requires_grad=True)], {})
        if fused:
            for p in self._params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook))

    # the groups are the per-tensor optimizers' own dicts: an LR scheduler writing "lr" here reaches them
    @property
    def param_groups(self):
        return [g for opt in self._optimizers for g in opt.param_groups]

    @param_groups.setter
    def param_groups(self, value):       # Optimizer.__init__ assigns its placeholder groups; not ours
        pass

    def add_param_group(self, param_group):
        if getattr(self, "_optimizers", None) and param_group["params"] and any(
                id(p) in self._by_param for p in param_group["params"]):
            raise ValueError("a parameter appears in more than one group")

    # ---- stepping ------------------------------------------------------------------------------------------
    def _hook(self, p):
        if p.grad is None:
            return
        self._step_one(p)
        p.grad = None              # free it now: no full set of gradients ever exists

    @torch.no_grad()
    def _step_one(self, p):
        index, opt = self._by_param[id(p)]
        if p.dtype != torch.bfloat16:
            opt.step()
            return
        # bf16 storage: the update in fp32, written back with stochastic rounding into the weight's own bf16
        # storage: the weights stay where they are, and only this step's temporaries come and go (a new bf16
        # tensor per weight per step, made between the backward's temporaries, fragmented a CPU run's heap:
        # hundreds of MB of resident memory above the tensors, issue 21.4)
        stored = p.data
        grad = p.grad.float()
        p.grad = None
        p.data = stored.float()
        p.grad = grad
        del grad                   # the optimizer's: freed when it is done with it
        try:
            opt.step()
        finally:
            gen = torch.Generator(device=p.device).manual_seed(_seed(self.seed, self.steps_done, index))
            p.grad = None
            updated, p.data = p.data, stored
            stochastic_round_to_bf16(updated, gen, out=stored)
            del updated

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        if not self.fused:
            for p in self._params:
                if p.grad is not None:
                    self._step_one(p)
        self.steps_done += 1
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for opt in self._optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self):
        return {"per_parameter": [opt.state_dict() for opt in self._optimizers], "steps_done": self.steps_done}

    def load_state_dict(self, state_dict):
        states = state_dict.get("per_parameter") if isinstance(state_dict, dict) else None
        if states is None or len(states) != len(self._optimizers):
            raise ValueError("optimizer state: not a per-parameter state of this run (fused_backward / "
                             "weights_dtype changed?)")
        for p, opt, state in zip(self._params, self._optimizers, states):
            # torch casts loaded state to the parameter's dtype: a bf16 tensor's fp32 moments must stay fp32
            stored = p.data
            if stored.dtype == torch.bfloat16:
                p.data = stored.float()
            try:
                opt.load_state_dict(state)
            finally:
                p.data = stored
        self.steps_done = int(state_dict.get("steps_done", 0))

    def close(self):
        """Remove the backward hooks (the trained model must not keep the optimizer alive)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def build_training_optimizer(param_groups, settings):
    """The optimizer the trainer uses: per-parameter when fused_backward or weights_dtype bf16 asks for it."""
    if not needs_per_parameter(settings):
        return build_optimizer(param_groups, settings)
    return PerParameterOptimizer(param_groups, settings, fused=bool(getattr(settings, "fused_backward", False)),
                                 seed=settings.seed)


__all__ = ["PerParameterOptimizer", "build_training_optimizer", "needs_per_parameter", "stochastic_round_to_bf16"]
