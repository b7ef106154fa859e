"""LoRA (Hu et al. 2021): fine-tune a model through small low-rank adapters while its own weights stay frozen.

Each adapted linear layer computes  y = x W^T (+ b) + scale * (x A^T) B^T,  A (r, in) and B (out, r) trained,
W and b frozen, scale = alpha / r (alpha / sqrt(r) with rslora). B starts at zero, so training starts from the
base model exactly; A as PEFT initialises it (kaiming-uniform: U(-1/sqrt(in), 1/sqrt(in))).

What it saves: no gradient and no AdamW state for the base (4 bytes per base parameter for the weights alone
instead of 16), and the weight-gradient products of the frozen matrices (a third of a step's GEMM work). The
lm-head, the embeddings and the norms are frozen too.

Targets name the projections as Llama's modules do: q, k, v, o, gate, up, down ("q_proj" etc. are accepted; "all"
is all of them that the model has). fastllm keeps q|k|v in one matrix (attn.c_attn) and gate|up in another
(mlp.c_fc): their targets share one adapter, with one A, whose B only changes the rows of the targeted
projections (the other rows of B stay zero). So "q,v" on a Llama trains A (r, C) and the q and v rows of B -- in
PEFT terms q_proj and v_proj with equal lora_A tensors (fastllm.hf writes and reads PEFT's adapter files). An
adapter read from PEFT with separate A's per projection becomes one of their total rank, exactly.

The adapters live in one flat float32 buffer like the model's (`params`, with named views `p`, stacked over layers
as (L, r, in) and (L, out, r)), with gradients `grads` and a compute copy where the model has one (bf16 on the GPU):
the optimizer trains a Lora as it trains a GPT (model.trainable()).

>>> model = load_model("Qwen2.5-0.5B-Instruct/")
>>> model.add_lora(LoraConfig(r=16, alpha=32, targets=("q", "k", "v", "o")))
>>> opt = AdamW(model, lr=2e-4)                   # the adapters' parameters only
>>> model.merge_lora()                             # W += scale * B @ A: a plain model again

Serving many adapters over one base at once (`fastllm serve --lora-modules`): LoraRuns applies a different Lora to
each contiguous range of a batch's rows (KVCache.decode_rows(..., loras=)).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from . import checks, ops

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
FUSED = {"q": "attn.c_attn.weight", "k": "attn.c_attn.weight", "v": "attn.c_attn.weight", "o": "attn.c_proj.weight",
         "gate": "mlp.c_fc.weight", "up": "mlp.c_fc.weight", "down": "mlp.c_proj.weight"}  # target -> its matrix


@dataclass(frozen=True)
class LoraConfig:
    """r: the adapters' rank; alpha: their scale's numerator (scale = alpha / r, or alpha / sqrt(r) with rslora);
    targets: the projections adapted (TARGETS, "q_proj"-style names, or "all")."""

    r: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("all",)
    rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r < 1:
            raise ValueError(f"lora r (the rank) must be an integer >= 1, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora alpha must be a finite number > 0, got {self.alpha!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        names = []
        for t in targets:
            for name in str(t).replace(",", " ").split():
                name = name.removesuffix("_proj")
                if name not in (*TARGETS, "all", "all-linear"):
                    raise ValueError(f"lora target {t!r} is not one of {TARGETS} (or q_proj, ..., or all)")
                names += TARGETS if name in ("all", "all-linear") else [name]
        if not names:
            raise ValueError("lora targets: name at least one projection")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in names))

    @classmethod
    def of(cls, cfg) -> LoraConfig | None:
        """From a training config's lora_r, lora_alpha, lora_targets (options.LORA_*); None where lora_r is 0. Checks
        its base_weights (options.BASE_WEIGHTS) too: a base held in bf16 or int8 trains adapters, on the CPU."""
        if cfg.base_weights is not None and (not cfg.lora_r or cfg.device != "cpu"):
            raise ValueError(f"base_weights={cfg.base_weights!r}: a base held in {cfg.base_weights} is frozen and on "
                             "the CPU: give --lora-r (adapters to train) and --device cpu")
        return cls(cfg.lora_r, cfg.lora_alpha, (cfg.lora_targets,)) if cfg.lora_r else None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def to_dict(self) -> dict:
        return {"r": int(self.r), "alpha": float(self.alpha), "targets": list(self.targets), "rslora": self.rslora}


def target_rows(cfg, target: str) -> tuple[str, tuple[int, int]]:
    """(the fastllm matrix, its rows [r0, r1)) that a target's projection is, for a GPTConfig."""
    NH, NKV, hd, H, C = cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.mlp_width, cfg.n_embd
    rows = {"q": (0, NH * hd), "k": (NH * hd, (NH + NKV) * hd), "v": ((NH + NKV) * hd, (NH + 2 * NKV) * hd),
            "o": (0, C), "down": (0, C), "gate": (0, H), "up": (H, 2 * H) if cfg.fc_width == 2 * H else (0, H)}
    if target == "gate" and cfg.fc_width != 2 * H:
        raise ValueError(f"lora target 'gate': this model's MLP ({cfg.mlp}) has no gate projection")
    return FUSED[target], rows[target]


def adapted_rows(cfg, targets) -> dict[str, list[tuple[int, int]]]:
    """{fastllm matrix: the row ranges of it that its adapter's B changes} for the targets a model has ("all" leaves
    out what it lacks: gate on an MLP without one)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for t in targets:
        if t == "gate" and cfg.fc_width != 2 * cfg.mlp_width and len(targets) == len(TARGETS):
            continue
        matrix, rows = target_rows(cfg, t)
        out.setdefault(matrix, []).append(rows)
    return out


class Lora:
    """The adapters of one model (see the module doc), on its device. ranks: {matrix: rank} where an adapter read
    from a file has another rank than config.r (PEFT's separate A's of the fused projections); rows: {matrix: row
    ranges of B that train} (default: the config's targets)."""

    def __init__(self, model, config: LoraConfig, seed: int = 0, ranks: dict | None = None,
                 rows: dict | None = None):
        cfg = model.config
        self.config, self.scale = config, config.scale
        self.base = None  # the folder of the frozen model (GPT.add_lora sets it; checkpoints name it)
        rows = adapted_rows(cfg, config.targets) if rows is None else rows
        self.rows = {m: sorted(rows[m]) for m in model.shapes if m in rows}  # (the model's order: one flat layout)
        self.ranks = {m: int((ranks or {}).get(m, config.r)) for m in self.rows}
        shapes = model.shapes
        self.shapes = {}
        for m, r in self.ranks.items():
            L, out, inp = shapes[m]
            self.shapes[f"{m[:-len('.weight')]}.lora_A"] = (L, r, inp)
            self.shapes[f"{m[:-len('.weight')]}.lora_B"] = (L, out, r)
        self.num_parameters = sum(math.prod(s) for s in self.shapes.values())
        # the rows of each B that stay zero: (offset, count) within one layer's (out, r) block
        self.frozen_rows = {}
        for m, keep in self.rows.items():
            out, r = shapes[m][1], self.ranks[m]
            edges = sorted(keep)
            gaps, at = [], 0
            for r0, r1 in edges:
                if r0 > at:
                    gaps.append((at * r, (r0 - at) * r))
                at = max(at, r1)
            if at < out:
                gaps.append((at * r, (out - at) * r))
            self.frozen_rows[m] = gaps
        host = np.zeros(self.num_parameters, np.float32)
        rng = np.random.default_rng(seed)
        for name, v in self._views(ops, host).items():
            if name.endswith("lora_A"):  # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
                bound = 1.0 / math.sqrt(v.shape[-1])
                v[...] = rng.uniform(-bound, bound, v.shape).astype(np.float32)
        self._place(model, host)

    @staticmethod
    def matrix(name: str) -> str:
        """The model matrix an adapter tensor belongs to: 'attn.c_attn.lora_A' -> 'attn.c_attn.weight'."""
        return name.rsplit(".", 1)[0] + ".weight"

    def _views(self, bk, flat) -> dict:
        out, off = {}, 0
        for name, shape in self.shapes.items():
            out[name] = bk.view(flat, off, shape)
            off += math.prod(shape)
        return out

    def _per_layer(self, bk, views: dict) -> dict:
        return {n: [bk.view(v, l * math.prod(v.shape[1:]), tuple(v.shape[1:])) for l in range(v.shape[0])]
                for n, v in views.items()}

    def _place(self, model, host: np.ndarray) -> None:
        """Put the adapters where the model is (its backend and compute dtype), from float32 host values."""
        self.bk, self.act_dtype = model.bk, model.act_dtype
        self.params = self.bk.to_device(host) if model.device != "cpu" else host
        self.cparams = self.params if self.act_dtype == "float32" else self.bk.to_device(host, self.act_dtype)
        self.p = self._views(self.bk, self.params)
        self._pl = self._per_layer(self.bk, self._views(self.bk, self.cparams))
        self.grads, self._gl = None, {}
        self._scratch: dict = {}  # forward's x @ A^T when the caller keeps none (KV-cache passes)

    def host_params(self) -> np.ndarray:
        return self.params if isinstance(self.params, np.ndarray) else self.bk.to_numpy(self.params)

    # ---- what an optimizer trains (the interface GPT has: optim.AdamW, distributed) ------------------------

    def trainable(self) -> Lora:
        return self

    def _ensure_grads(self):
        if self.grads is None:
            self.grads = self.bk.zeros((self.num_parameters,), "float32")
            self._gl = self._per_layer(self.bk, self._views(self.bk, self.grads))
        return self.grads

    @property
    def g(self) -> dict:
        """Named views of the gradients (like `p`)."""
        return self._views(self.bk, self._ensure_grads())

    def zero_grad(self) -> None:
        self.bk.zero_(self._ensure_grads())

    def grad_norm(self) -> float:
        return self.bk.global_norm(self._ensure_grads())

    def _sync_compute_copy(self) -> None:
        if self.cparams is not self.params:
            self.bk.copy_(self.cparams, self.params)

    def state_dict(self) -> dict[str, np.ndarray]:
        """{name: float32 host array (L, r, in) / (L, out, r)}: views on the CPU, copies from the GPU."""
        return self._views(ops, self.host_params())

    def load_state_dict(self, tensors: dict, where: str = "adapter") -> Lora:
        """Copy adapter tensors in: exactly the names and shapes of `shapes`, finite floats (ValueError naming
        `where` and the tensor otherwise)."""
        if set(tensors) != set(self.shapes):
            raise ValueError(f"{where}: adapter tensors {sorted(tensors)} do not match this adapter's "
                             f"{sorted(self.shapes)}")
        host = np.empty(self.num_parameters, np.float32)
        checks.fill_tensors(self._views(ops, host), tensors, where, "the adapter")
        self.bk.copy_(self.params, host)
        self._sync_compute_copy()
        return self

    # ---- the computation (called by the model for each adapted linear layer) -------------------------------

    def adapts(self, matrix: str) -> bool:
        return matrix in self.ranks

    def forward(self, bk, matrix: str, l: int, x, out, t=None) -> None:
        """out += scale * (x @ A^T) @ B^T for layer l's adapter of `matrix`; t (N, r): x @ A^T, kept for the
        backward (allocated here when None)."""
        stem = matrix[:-len(".weight")]
        A, B = self._pl[stem + ".lora_A"][l], self._pl[stem + ".lora_B"][l]
        if t is None:  # (inference: one scratch per shape, reused by every layer and step)
            key = (x.shape[0], A.shape[0])
            t = self._scratch.get(key)
            if t is None:
                if len(self._scratch) >= 8:  # (prompts of many lengths: start over)
                    self._scratch.clear()
                t = self._scratch[key] = bk.empty(key, self.act_dtype)
        bk.gemm(x, A, trans_b=True, out=t)
        bk.gemm(t, B, trans_b=True, alpha=self.scale, accumulate=True, out=out)

    def backward(self, bk, matrix: str, l: int, dout, x, dx, t, dt) -> None:
        """The adapter's part of a linear layer's backward: dA, dB += (the frozen rows of B excepted) and dx +=
        (when dx is not None); t is the forward's x @ A^T, dt (N, r) scratch."""
        stem = matrix[:-len(".weight")]
        self._ensure_grads()
        A, B = self._pl[stem + ".lora_A"][l], self._pl[stem + ".lora_B"][l]
        dA, dB = self._gl[stem + ".lora_A"][l], self._gl[stem + ".lora_B"][l]
        bk.gemm(dout, B, alpha=self.scale, out=dt)  # dt = scale * dout @ B          (N, r)
        bk.gemm(dout, t, trans_a=True, alpha=self.scale, accumulate=True, out=dB)  # dB += scale * dout^T t
        for off, n in self.frozen_rows[matrix]:
            bk.zero_(bk.view(dB, off, (n,)))
        bk.gemm(dt, x, trans_a=True, accumulate=True, out=dA)  # dA += dt^T x          (r, in)
        if dx is not None:
            bk.gemm(dt, A, accumulate=True, out=dx)  # dx += dt @ A

    def delta(self, matrix: str, l: int) -> np.ndarray:
        """scale * B @ A of layer l's adapter of `matrix` (out, in), float32 on the host: what merging adds."""
        stem = matrix[:-len(".weight")]
        p = self.state_dict()
        A, B = p[stem + ".lora_A"][l].astype(np.float64), p[stem + ".lora_B"][l].astype(np.float64)
        return (self.scale * (B @ A)).astype(np.float32)


class LoraRuns:
    """Several adapters over one batch, each on its own contiguous range of rows: multi-LoRA serving, as Punica's
    and S-LoRA's segmented GEMM. The base product runs once over every row (the weights are read once, which is
    what a decode step costs), then each adapter's two small products run on views of its rows only -- no gather
    or scatter, because the server keeps each adapter's sequences in adjacent rows. runs: [(first row, rows, Lora
    or None)], None: the base alone. Rows are token rows (a sequence's T tokens in a prefill are T rows).

    >>> runs = LoraRuns.of([lora_a, lora_a, None, lora_b])   # rows 0-1: lora_a, row 2: the base, row 3: lora_b
    """

    def __init__(self, runs):
        self.runs = [(r0, n, lora) for r0, n, lora in runs if lora is not None]

    @classmethod
    def of(cls, loras, T: int = 1):
        """What a pass over len(loras) sequences of T tokens applies, loras[i] to sequence i: the one Lora (or None)
        they all have -- then the layers run exactly as for a model with that adapter alone -- else the LoraRuns
        of each run of equal adapters."""
        runs, r0 = [], 0
        for _, group in itertools.groupby(loras, key=id):  # (adapters are equal when they are the same object)
            n = len(list(group))
            runs.append((r0 * T, n * T, loras[r0]))
            r0 += n
        return runs[0][2] if len(runs) == 1 else cls(runs)

    def adapts(self, matrix: str) -> bool:
        return any(lora.adapts(matrix) for _, _, lora in self.runs)

    def forward(self, bk, matrix: str, l: int, x, out, pre_gelu=None) -> None:
        """out (N, OC) += each adapter's scale * (x A^T) B^T on its rows of x (N, C), once the base product is in
        out; with pre_gelu (the base product before a fused GELU, out = gelu(pre_gelu)): pre_gelu += on those
        rows, then their out = gelu(pre_gelu). The other rows keep the fused GELU they had without adapters."""
        C, OC = x.shape[1], out.shape[1]
        raw = out if pre_gelu is None else pre_gelu
        for r0, n, lora in self.runs:
            if lora.adapts(matrix):
                rows = bk.view(raw, r0 * OC, (n, OC))
                lora.forward(bk, matrix, l, bk.view(x, r0 * C, (n, C)), rows)
                if pre_gelu is not None:
                    bk.gelu_forward(rows, out=bk.view(out, r0 * OC, (n, OC)))
