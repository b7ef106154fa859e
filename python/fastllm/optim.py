"""AdamW over a GPT's flat buffers (either device), global-norm gradient clipping, and the learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np

from .model import GPT, decays


class AdamW:
    """AdamW with decoupled weight decay on matrices only (see model.decays). The state m, v is one float32
    allocation of 2 * num_parameters on the model's device (so a checkpoint saves two flat arrays); the update
    runs on the fp32 master weights and also writes the model's compute copy (bf16 on the GPU). Make the
    optimizer after model.to(device) (and after model.add_lora: then it trains the adapters, model.trainable()).

    >>> opt = AdamW(model, lr=6e-4, weight_decay=0.1)
    >>> opt.step(grad_scale=1.0)     # grads * grad_scale (clipping, accumulation) then the update
    """

    def __init__(self, model: GPT, lr: float = 6e-4, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, shard: tuple[int, int] | None = None):
        if lr < 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"bad AdamW hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        model = model.trainable()  # the model's parameters, or its LoRA adapters' (the base frozen)
        self.model, bk, n = model, model.bk, model.num_parameters
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        # shard: the elements [lo, hi) of the flat parameters this optimizer updates (ZeRO-1, fastllm.distributed);
        # its m, v cover only those. None: all of them.
        lo, hi = (0, n) if shard is None else shard
        if not 0 <= lo <= hi <= n:
            raise ValueError(f"shard must be a range [lo, hi) within the {n} parameters, got {shard}")
        self.shard = (lo, hi)
        self.state = bk.zeros((2 * (hi - lo),), "float32")
        self.m, self.v = bk.view(self.state, 0, (hi - lo,)), bk.view(self.state, hi - lo, (hi - lo,))
        self.t = 0
        # runs of consecutive tensors with the same decay flag, cut to the shard: one kernel call per run instead of
        # one per tensor
        self._groups: list[tuple[int, int, bool]] = []
        off = 0
        for name, shape in model.shapes.items():
            a, b, d = max(off, lo), min(off + math.prod(shape), hi), decays(name)
            off += math.prod(shape)
            if a >= b:
                continue
            if self._groups and self._groups[-1][2] == d:
                o, k, _ = self._groups[-1]
                self._groups[-1] = (o, k + b - a, d)
            else:
                self._groups.append((a, b - a, d))

    def step(self, lr: float | None = None, grad_scale: float = 1.0) -> None:
        self.t += 1
        lr = self.lr if lr is None else lr
        mdl, bk, lo = self.model, self.model.bk, self.shard[0]
        grads = mdl._ensure_grads()
        copy = mdl.cparams if mdl.cparams is not mdl.params else None
        for off, n, d in self._groups:
            p, g = (bk.view(x, off, (n,)) for x in (mdl.params, grads))
            m, v = (bk.view(x, off - lo, (n,)) for x in (self.m, self.v))
            bk.adamw_step(p, g, m, v, lr=lr, t=self.t, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                          weight_decay=self.weight_decay if d else 0.0, grad_scale=grad_scale,
                          params_copy=None if copy is None else bk.view(copy, off, (n,)))

    def state_dict(self) -> dict:
        """{"m", "v": float32 numpy arrays (flat, like model.params, or its shard), "t": steps taken} for checkpoints
        (views on the CPU, copies from the GPU)."""
        bk = self.model.bk
        return {"m": bk.to_numpy(self.m), "v": bk.to_numpy(self.v), "t": self.t}

    def load_state_dict(self, state: dict, where: str = "optimizer state") -> None:
        n = self.shard[1] - self.shard[0]
        for k in ("m", "v"):
            a = np.asarray(state[k]) if k in state else None
            if a is None or a.shape != (n,):
                got = "missing" if a is None else f"shape {a.shape}"
                what = "the model's parameters" if n == self.model.num_parameters else f"the shard {self.shard}"
                raise ValueError(f"{where}: {k!r} must have shape {(n,)} ({what}), got {got}")
            if a.dtype.kind != "f" or not np.isfinite(a).all():
                raise ValueError(f"{where}: {k!r} must hold finite floating-point values")
        t = state.get("t")
        if not isinstance(t, (int, np.integer)) or t < 0:
            raise ValueError(f"{where}: 't' (steps taken) must be an integer >= 0, got {t!r}")
        bk = self.model.bk
        bk.copy_(self.m, np.ascontiguousarray(state["m"], np.float32))
        bk.copy_(self.v, np.ascontiguousarray(state["v"], np.float32))
        self.t = int(t)


def lr_schedule(step: int, max_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup for `warmup` steps, then cosine decay from max_lr to min_lr at `total` steps."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    ratio = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
