"""Optimizers by name, with the UNet and text-encoder learning rates as separate parameter groups.

torch and the optional packages are imported only when an optimizer is built, so `missing_optimizer_package`
(used by settings validation at node-load time) stays cheap.

Notes on what each one does with the settings:
- AdamW (torch), AdamW8bit (bitsandbytes; 8-bit moment buffers for tensors of >= 4096 elements, smaller ones
  keep fp32 state, as bitsandbytes decides), Prodigy (prodigyopt): adam_beta1/2, adam_epsilon, decoupled
  weight_decay.
- Lion (lion-pytorch, else bitsandbytes' 32-bit Lion), Lion8bit (bitsandbytes): their own betas (0.9, 0.99),
  decoupled weight_decay.
- Adafactor (transformers): fixed learning rate (relative_step / scale_parameter off, so the LR schedule rules).
- SGD (torch): sgd_momentum; weight_decay is classic L2.
"""
from __future__ import annotations

import importlib.util
from typing import Iterable

from .. import compat
from ..compat import OPTIONAL_PACKAGES, install_hint, missing_optimizer_package


class OptimizerUnavailable(ImportError):
    """The chosen optimizer needs a package that is missing or does not load here."""


def _import(name: str, module: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # bitsandbytes may raise RuntimeError/OSError on a broken CUDA setup, not only ImportError
        raise OptimizerUnavailable(f"optimizer {name!r}: importing {module} failed ({type(e).__name__}: {e}); "
                                   f"{install_hint(name)}") from e


def training_param_groups(unet_params: Iterable, text_encoder_params: Iterable, settings) -> list[dict]:
    """Parameter groups: {"name": "unet", lr = learning_rate} and {"name": "text_encoder", lr =
    text_encoder_lr (or learning_rate)}. Only parameters with requires_grad; empty groups are left out.
    `settings` must be resolved (learning_rate not auto)."""
    groups = []
    for name, params, lr in (("unet", unet_params, settings.unet_lr),
                             ("text_encoder", text_encoder_params, settings.text_encoder_learning_rate)):
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            groups.append({"name": name, "params": trainable, "lr": lr})
    return groups


def normalise_groups(param_groups) -> list[dict]:
    """Parameter groups as dicts with a list of params (a plain iterable becomes one group); empty groups dropped,
    none left is an error. build_optimizer and fused_backward's optimizer see the same groups."""
    groups = list(param_groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    for g in groups:
        g["params"] = list(g["params"])
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters: enable train_unet or set text_encoder_ratio above 0 "
                         "(and check that the model's weights have requires_grad)")
    return [g for g in groups if g["params"]]


def build_optimizer(param_groups, settings):
    """Build settings.optimizer over `param_groups` (list of dicts with "params" and optional "lr", or a plain
    iterable of parameters). Groups without "lr" get settings.learning_rate. Raises OptimizerUnavailable
    (naming the pip package and an alternative) when an optional package is missing."""
    import torch

    name = settings.optimizer
    groups = normalise_groups(param_groups)
    lr = settings.unet_lr
    wd = settings.weight_decay
    betas = (settings.adam_beta1, settings.adam_beta2)
    eps = settings.adam_epsilon
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    if name == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=settings.sgd_momentum, weight_decay=wd)
    if name in OPTIONAL_PACKAGES:
        missing = missing_optimizer_package(name)
        if missing:
            raise OptimizerUnavailable(f"optimizer {name!r} {missing}")
    if name == "AdamW8bit":
        bnb = _import(name, "bitsandbytes")
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    if name == "Lion8bit":
        bnb = _import(name, "bitsandbytes")
        return bnb.optim.Lion8bit(groups, lr=lr, weight_decay=wd)
    if name == "Lion":
        if compat.installed("lion_pytorch"):
            return _import(name, "lion_pytorch").Lion(groups, lr=lr, weight_decay=wd)
        return _import(name, "bitsandbytes").optim.Lion(groups, lr=lr, weight_decay=wd)
    if name == "Prodigy":
        prodigyopt = _import(name, "prodigyopt")
        # safeguard_warmup: recommended by the Prodigy authors when the LR schedule has a warm-up
        return prodigyopt.Prodigy(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd, decouple=True,
                                  use_bias_correction=True, safeguard_warmup=settings.lr_warmup_steps > 0)
    if name == "Adafactor":
        optimization = _import(name, "transformers.optimization")
        return _matrix_adafactor(optimization.Adafactor)(groups, lr=lr, weight_decay=wd, scale_parameter=False,
                                                         relative_step=False, warmup_init=False)
    from ..settings import OPTIMIZERS

    raise ValueError(f"optimizer = {name!r} is not known; use one of: {', '.join(OPTIMIZERS)}")


def _matrix_adafactor(adafactor):
    """transformers' Adafactor, with every tensor of more than two dimensions (conv kernels, out x in x k x k)
    stepped as the matrix (out, in*k*k). transformers factors the second moment over the last two dimensions,
    the 3x3 of a kernel, which keeps a row state of out*in*3 values (about a third of the kernel); as a matrix its
    state is out + in*k*k values. Same update rule; a state saved in the old layout restarts for those tensors."""
    import torch

    class MatrixAdafactor(adafactor):
        @torch.no_grad()
        def step(self, closure=None):
            shaped = []
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None or p.dim() <= 2 or not p.is_contiguous():
                        continue
                    flat = (p.shape[0], p[0].numel())
                    state = self.state.get(p)
                    if state and "exp_avg_sq_row" in state and state["exp_avg_sq_row"].dim() != 1:
                        self.state[p] = {}            # saved as transformers factors it: restart this tensor
                    grad, p.grad = p.grad, None
                    shaped.append((p, p.shape))
                    p.data = p.data.view(flat)
                    p.grad = grad.reshape(flat)
            try:
                return super().step(closure)
            finally:
                for p, shape in shaped:
                    grad, p.grad = p.grad, None
                    p.data = p.data.view(shape)
                    if grad is not None:
                        p.grad = grad.view(shape)

    return MatrixAdafactor


__all__ = ["build_optimizer", "training_param_groups", "missing_optimizer_package", "OptimizerUnavailable"]
