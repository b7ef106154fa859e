"""AdamW over a GPT's flat buffers, global-norm gradient clipping, and the learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np

from . import ops
from .model import GPT, _views, decays


class AdamW:
    """AdamW with decoupled weight decay on matrices only (see model.decays); state m, v are flat buffers
    shaped like model.params, so a checkpoint saves them as two arrays.

    >>> opt = AdamW(model, lr=6e-4, weight_decay=0.1)
    >>> opt.step(grad_scale=1.0)     # grads * grad_scale (clipping, accumulation) then the update
    """

    def __init__(self, model: GPT, lr: float = 6e-4, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1):
        if lr < 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"bad AdamW hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        self.model = model
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.m = np.zeros_like(model.params)
        self.v = np.zeros_like(model.params)
        self.t = 0
        self._m, self._v = _views(self.m, model.shapes), _views(self.v, model.shapes)

    def step(self, lr: float | None = None, grad_scale: float = 1.0) -> None:
        self.t += 1
        lr = self.lr if lr is None else lr
        p, g = self.model.p, self.model.g
        for name in p:
            wd = self.weight_decay if decays(name) else 0.0
            ops.adamw_step(p[name], g[name], self._m[name], self._v[name], lr=lr, t=self.t, beta1=self.betas[0],
                           beta2=self.betas[1], eps=self.eps, weight_decay=wd, grad_scale=grad_scale)


    def state_dict(self) -> dict:
        """{"m", "v": float32 numpy arrays (flat, like model.params), "t": steps taken} for checkpoints."""
        return {"m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, state: dict, where: str = "optimizer state") -> None:
        for k in ("m", "v"):
            a = np.asarray(state[k]) if k in state else None
            if a is None or a.shape != self.m.shape:
                got = "missing" if a is None else f"shape {a.shape}"
                raise ValueError(f"{where}: {k!r} must have shape {self.m.shape} (the model's parameters), got {got}")
        t = state.get("t")
        if not isinstance(t, (int, np.integer)) or t < 0:
            raise ValueError(f"{where}: 't' (steps taken) must be an integer >= 0, got {t!r}")
        self.m[...], self.v[...], self.t = state["m"], state["v"], int(t)


def grad_norm(model: GPT) -> float:
    """Global L2 norm of all gradients."""
    return ops.global_norm(model.grads)


def lr_schedule(step: int, max_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup for `warmup` steps, then cosine decay from max_lr to min_lr at `total` steps."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    ratio = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
