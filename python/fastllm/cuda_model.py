"""GPT-2 on the GPU: `CudaGPT`, the twin of model.GPT built from fastllm.cuda kernels, its AdamW and KV cache.

Memory, all allocated once (one cudaMalloc each, named views like GPT.p, same flat order as GPT.params):
  params    float32 master weights (N)         grads   float32 (N)        opt_state  float32 AdamW m, v (2N)
  cparams   the compute copy in `dtype` (bfloat16 by default) that every kernel reads; for float32 it IS params.
Activations (dtype T, fp32 for layernorm mean/rstd, attention lse and losses) are allocated per (B, T) like
GPT._activations. A training step is: forward (embedding, blocks, final layernorm, then the fused lm-head +
cross-entropy, which also accumulates the lm-head gradient into grads["wte"] and dlnf), backward (blocks in
reverse, embedding), AdamW on the fp32 master weights writing the bf16 copy (params_copy). The host reads back
only the per-token losses (one copy of B*T floats) and, when asked, the gradient norm: launches are queued on
the default stream and everything else stays on the GPU.

Interop: `CudaGPT(gpt)` uploads a host GPT; `to_cpu(gpt, opt)` / `load_from(gpt, opt)` copy parameters and the
AdamW state both ways, so train.py's checkpoints save and resume GPU runs. `kv_cache(B)` has GPT.kv_cache's
interface (prefill / decode -> float32 logits (B, V) of the last position), so sample.generate/stream work.

>>> gpu = CudaGPT(GPT(GPTConfig.preset("tiny", vocab_size=100)), dtype="float32")
>>> opt = gpu.optimizer(lr=1e-3)
>>> gpu.zero_grad(); loss = gpu.forward(x, y); gpu.backward(); opt.step(grad_scale=1.0)
"""

from __future__ import annotations

import math

import numpy as np

from . import cuda
from .model import GPT, GPTConfig, KVCacheBase, cache_length, check_token_ids, decays, param_shapes
from .ops import IGNORE_INDEX

DTYPES = ("bfloat16", "float32")


def _views(flat, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Named views of a flat DeviceArray, in the order of `shapes` (like model._views)."""
    out, off = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat.view(off, shape)
        off += n
    return out


def _layers(views: dict, n_layer: int) -> dict:
    """name -> list of per-layer views for the stacked (L, ...) tensors; the others map to themselves."""
    out = {}
    for name, v in views.items():
        if name in ("wte", "wpe") or name.startswith("ln_f"):
            out[name] = v
        else:
            per = math.prod(v.shape[1:])
            out[name] = [v.view(l * per, v.shape[1:]) for l in range(n_layer)]
    return out


def _lmhead_chunk_rows(N: int, V: int, dtype: str) -> int:
    """Rows of the fused classifier's logits chunk buffer: the binding's default chunk (<= ~256 MiB)."""
    return int(cuda._require().lmhead_chunk_rows(int(N), int(V), dtype))


class CudaGPT:
    """GPT-2 on one GPU. `model` is a host GPT (its weights are uploaded) or a GPTConfig (initialised on the
    host with `seed`, exactly like GPT(config, seed), then uploaded). dtype: "bfloat16" (default; fp32 master
    weights, gradients and optimizer state) or "float32" (everything fp32: the reference mode)."""

    def __init__(self, model: GPT | GPTConfig, seed: int = 0, dtype: str = "bfloat16", fuse_gelu: bool = True):
        cuda._require()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        host = model if isinstance(model, GPT) else GPT(model, seed=seed)
        self.config: GPTConfig = host.config
        self.dtype = dtype
        self.fuse_gelu = fuse_gelu
        self.shapes = param_shapes(self.config)
        self.num_parameters = sum(math.prod(s) for s in self.shapes.values())
        L = self.config.n_layer
        self.params = cuda.empty((self.num_parameters,), "float32")
        self.cparams = self.params if dtype == "float32" else cuda.empty((self.num_parameters,), dtype)
        self.p = _views(self.params, self.shapes)  # fp32 master weights
        self.pc = _views(self.cparams, self.shapes)  # compute copy (dtype), what the kernels read
        self._pcl = _layers(self.pc, L)
        self.grads = None  # allocated on first use (inference needs none)
        self.g: dict = {}
        self._gl: dict = {}
        self.adamw: CudaAdamW | None = None
        self.training = True
        self._acts: dict | None = None
        self._BT: tuple[int, int] | None = None
        self._ready_for_backward = False
        self.token_losses: np.ndarray | None = None
        self.load_from(host)

    # ---- parameters and host interop ---------------------------------------------------------------------

    def _ensure_grads(self) -> None:
        if self.grads is None:
            self.grads = cuda.zeros((self.num_parameters,), "float32")
            self.g = _views(self.grads, self.shapes)
            self._gl = _layers(self.g, self.config.n_layer)

    def _sync_compute_copy(self) -> None:
        if self.cparams is not self.params:
            self.cparams.copy_(self.params)  # float32 -> bfloat16 on the GPU (round to nearest even)

    def load_from(self, model: GPT, opt=None) -> CudaGPT:
        """Upload the host model's parameters (and, given a host optim.AdamW, its hyper-parameters, m, v and t
        into self.adamw, created if needed)."""
        if model.config.to_dict() != self.config.to_dict():
            raise ValueError(f"model config {model.config} differs from this CudaGPT's {self.config}")
        self.params.copy_(np.ascontiguousarray(model.params, np.float32))
        self._sync_compute_copy()
        if opt is not None:
            if self.adamw is None:
                self.adamw = CudaAdamW(self, opt.lr, opt.betas, opt.eps, opt.weight_decay)
            a = self.adamw
            a.lr, a.betas, a.eps, a.weight_decay = opt.lr, tuple(opt.betas), opt.eps, opt.weight_decay
            a.m.copy_(np.ascontiguousarray(opt.m, np.float32))
            a.v.copy_(np.ascontiguousarray(opt.v, np.float32))
            a.t = int(opt.t)
        return self

    def to_cpu(self, model: GPT | None = None, opt=None) -> GPT:
        """Copy the fp32 master parameters into `model` (a new host GPT if None) and, given a host optim.AdamW,
        this model's AdamW state (m, v, t) into it. Returns the host model."""
        if model is None:
            model = GPT(self.config, init=False)
        if model.config.to_dict() != self.config.to_dict():
            raise ValueError(f"model config {model.config} differs from this CudaGPT's {self.config}")
        model.params[...] = self.params.numpy()
        if opt is not None:
            if self.adamw is None:
                raise RuntimeError("this CudaGPT has no optimizer state to copy (call optimizer() first)")
            opt.m[...] = self.adamw.m.numpy()
            opt.v[...] = self.adamw.v.numpy()
            opt.t = self.adamw.t
        return model

    def optimizer(self, lr: float = 6e-4, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                  weight_decay: float = 0.1) -> CudaAdamW:
        """A fresh AdamW (m = v = 0, t = 0) on this model, kept as self.adamw."""
        self.adamw = CudaAdamW(self, lr, betas, eps, weight_decay)
        return self.adamw

    def zero_grad(self) -> None:
        self._ensure_grads()
        self.grads.zero_()

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients (one small readback)."""
        self._ensure_grads()
        return cuda.global_norm(self.grads)

    def train(self, mode: bool = True) -> CudaGPT:
        self.training = mode
        return self

    def eval(self) -> CudaGPT:
        return self.train(False)

    # ---- activations -------------------------------------------------------------------------------------

    def _activations(self, B: int, T: int) -> dict:
        """Buffers for a (B, T) batch, all views of one allocation (cuda.carve); per-layer tensors come as lists
        of (B*T, X) views of an (L, B*T, X) region (2-D, the layout the kernels take)."""
        if self._BT == (B, T) and self._acts is not None:
            return self._acts
        self._acts = None  # free the old set before allocating the new one
        cfg = self.config
        L, C, NH, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size
        N, dt = B * T, self.dtype

        f32, per_layer = "float32", {
            "ln1": C, "ln1_mean": 1, "ln1_rstd": 1, "qkv": 3 * C, "atty": C, "att_lse": NH, "residual2": C,
            "ln2": C, "ln2_mean": 1, "ln2_rstd": 1, "fch": 4 * C, "fch_gelu": 4 * C, "residual3": C,
        }
        stats = ("ln1_mean", "ln1_rstd", "att_lse", "ln2_mean", "ln2_rstd")
        specs = {k: ((L, N, w), f32 if k in stats else dt) for k, w in per_layer.items()}
        specs.update({
            "idx": ((B, T), "int32"), "targets": ((N,), "int32"), "encoded": ((N, C), dt),
            "attproj": ((N, C), dt), "fcproj": ((N, C), dt),  # scratch until the residual add
            "lnf": ((N, C), dt), "lnf_mean": ((N,), f32), "lnf_rstd": ((N,), f32), "losses": ((N,), f32),
            "lm_scratch": ((_lmhead_chunk_rows(N, V, dt), V), dt),
            # gradient scratch, reused by every layer
            "dres": ((N, C), dt), "dlnf": ((N, C), dt), "dfch_gelu": ((N, 4 * C), dt), "dfch": ((N, 4 * C), dt),
            "dln": ((N, C), dt), "datty": ((N, C), dt), "dqkv": ((N, 3 * C), dt),
        })
        a = cuda.carve(specs)  # one allocation per (B, T)
        for k, w in per_layer.items():  # per-layer (N, width) views of the (L, N, width) buffers
            a[k] = [a[k].view(l * N * w, (N, w)) for l in range(L)]
        for k in ("ln1_mean", "ln1_rstd", "ln2_mean", "ln2_rstd"):  # (N,) per layer
            a[k] = [x.reshape((N,)) for x in a[k]]
        # attention statistics are (B, NH, T) per layer: the same memory seen as the kernel wants it
        a["att_lse"] = [x.reshape((B, NH, T)) for x in a["att_lse"]]
        self._acts, self._BT = a, (B, T)
        return a

    def _check_ids(self, x, name: str) -> np.ndarray:
        return check_token_ids(x, name, self.config, check_range=True)  # the GPU kernels cannot report bad ids

    # ---- forward -----------------------------------------------------------------------------------------

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> logits (B, T, V) as a float32 numpy array if targets is None (eval use;
        allocates B*T*V floats), else the mean cross-entropy over targets != -1 (a float). In training mode a
        forward with targets also ACCUMULATES the lm-head part of the gradient into grads (zero_grad first) and
        prepares backward(). self.token_losses (B, T) holds the per-token losses afterwards."""
        idx = self._check_ids(idx, "idx")
        B, T = idx.shape
        V, N = self.config.vocab_size, B * T
        if targets is not None:
            targets = np.asarray(targets)
            if not np.issubdtype(targets.dtype, np.integer):
                raise TypeError(f"targets must be integer token ids, got dtype {targets.dtype}")
            if targets.shape != (B, T):
                raise ValueError(f"targets must have the shape of idx {(B, T)}, got {targets.shape}")
            valid = targets != IGNORE_INDEX
            if ((targets < 0) | (targets >= V))[valid].any():
                raise ValueError(f"targets hold ids outside [0, {V}) (other than the ignore index {IGNORE_INDEX})")
        a = self._activations(B, T)
        self._ready_for_backward = False
        a["idx"].copy_(idx)
        self._trunk(a, B, T)
        if targets is None:
            logits = cuda.empty((N, V), "float32")
            cuda.gemm(logits, a["lnf"], self.pc["wte"], trans_b=True)
            return logits.numpy().reshape(B, T, V)
        n_valid = int(np.count_nonzero(valid))
        scale = 1.0 / max(n_valid, 1)
        a["targets"].copy_(np.ascontiguousarray(targets.reshape(N), np.int32))
        if self.training:
            self._ensure_grads()
            a["dlnf"].zero_()
            cuda.lmhead_cross_entropy(a["losses"], a["dlnf"], self.g["wte"], a["lnf"], self.pc["wte"], a["targets"],
                                      grad_scale=scale, ignore_index=IGNORE_INDEX, scratch=a["lm_scratch"])
            self._ready_for_backward = True
        else:
            cuda.lmhead_cross_entropy(a["losses"], None, None, a["lnf"], self.pc["wte"], a["targets"],
                                      grad_scale=scale, ignore_index=IGNORE_INDEX, scratch=a["lm_scratch"])
        losses = a["losses"].numpy()  # the step's one readback (it also waits for the queued kernels)
        self.token_losses = losses.reshape(B, T)
        return float(losses.sum(dtype=np.float64) * scale)

    __call__ = forward

    def _trunk(self, a: dict, B: int, T: int) -> None:
        """Embedding, blocks and final layernorm: fills the activations up to lnf (B*T, C)."""
        cfg, pc, pl = self.config, self.pc, self._pcl
        C, NH, eps = cfg.n_embd, cfg.n_head, cfg.layernorm_eps
        cuda.embedding_forward(a["encoded"].reshape((B, T, C)), a["idx"], pc["wte"], pc["wpe"])
        residual = a["encoded"]
        for l in range(cfg.n_layer):
            cuda.layernorm_forward(a["ln1"][l], a["ln1_mean"][l], a["ln1_rstd"][l], residual,
                                   pl["ln_1.weight"][l], pl["ln_1.bias"][l], eps)
            cuda.matmul_forward(a["qkv"][l], a["ln1"][l], pl["attn.c_attn.weight"][l], pl["attn.c_attn.bias"][l])
            cuda.attention_forward(a["atty"][l].reshape((B, T, C)), a["att_lse"][l],
                                   a["qkv"][l].reshape((B, T, 3 * C)), NH)
            cuda.matmul_forward(a["attproj"], a["atty"][l], pl["attn.c_proj.weight"][l], pl["attn.c_proj.bias"][l])
            cuda.residual_forward(a["residual2"][l], residual, a["attproj"])
            cuda.layernorm_forward(a["ln2"][l], a["ln2_mean"][l], a["ln2_rstd"][l], a["residual2"][l],
                                   pl["ln_2.weight"][l], pl["ln_2.bias"][l], eps)
            if self.fuse_gelu:  # GELU in the matmul's epilogue: fch = ln2 @ W^T + b, fch_gelu = gelu(fch)
                cuda.matmul_forward(a["fch_gelu"][l], a["ln2"][l], pl["mlp.c_fc.weight"][l], pl["mlp.c_fc.bias"][l],
                                    pre_gelu=a["fch"][l])
            else:
                cuda.matmul_forward(a["fch"][l], a["ln2"][l], pl["mlp.c_fc.weight"][l], pl["mlp.c_fc.bias"][l])
                cuda.gelu_forward(a["fch_gelu"][l], a["fch"][l])
            cuda.matmul_forward(a["fcproj"], a["fch_gelu"][l], pl["mlp.c_proj.weight"][l], pl["mlp.c_proj.bias"][l])
            cuda.residual_forward(a["residual3"][l], a["residual2"][l], a["fcproj"])
            residual = a["residual3"][l]
        cuda.layernorm_forward(a["lnf"], a["lnf_mean"], a["lnf_rstd"], residual, pc["ln_f.weight"], pc["ln_f.bias"],
                               eps)

    # ---- backward ----------------------------------------------------------------------------------------

    def backward(self) -> None:
        """Accumulate (+=) the gradient of the last training forward's loss into self.grads (on the GPU; no
        host synchronisation)."""
        if not self._ready_for_backward:
            raise RuntimeError("backward() needs a forward(idx, targets) in training mode first")
        self._ready_for_backward = False
        cfg, pc, pl, g, gl, a = self.config, self.pc, self._pcl, self.g, self._gl, self._acts
        B, T = self._BT
        L, NH, C = cfg.n_layer, cfg.n_head, cfg.n_embd
        dres = a["dres"]  # gradient of the residual stream, flowing down through the layers
        dres.zero_()
        cuda.layernorm_backward(dres, g["ln_f.weight"], g["ln_f.bias"], a["dlnf"], a["residual3"][L - 1],
                                pc["ln_f.weight"], a["lnf_mean"], a["lnf_rstd"])
        for l in reversed(range(L)):
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            # MLP half: residual3 = residual2 + c_proj(gelu(c_fc(ln2(residual2))))
            for k in ("dfch_gelu", "dfch", "dln"):
                a[k].zero_()
            cuda.matmul_backward(a["dfch_gelu"], gl["mlp.c_proj.weight"][l], gl["mlp.c_proj.bias"][l], dres,
                                 a["fch_gelu"][l], pl["mlp.c_proj.weight"][l])
            cuda.gelu_backward(a["dfch"], a["dfch_gelu"], a["fch"][l])
            cuda.matmul_backward(a["dln"], gl["mlp.c_fc.weight"][l], gl["mlp.c_fc.bias"][l], a["dfch"], a["ln2"][l],
                                 pl["mlp.c_fc.weight"][l])
            cuda.layernorm_backward(dres, gl["ln_2.weight"][l], gl["ln_2.bias"][l], a["dln"], a["residual2"][l],
                                    pl["ln_2.weight"][l], a["ln2_mean"][l], a["ln2_rstd"][l])
            # attention half: residual2 = residual + c_proj(attn(c_attn(ln1(residual))))
            for k in ("datty", "dqkv", "dln"):
                a[k].zero_()
            cuda.matmul_backward(a["datty"], gl["attn.c_proj.weight"][l], gl["attn.c_proj.bias"][l], dres,
                                 a["atty"][l], pl["attn.c_proj.weight"][l])
            cuda.attention_backward(a["dqkv"].reshape((B, T, 3 * C)), a["datty"].reshape((B, T, C)),
                                    a["qkv"][l].reshape((B, T, 3 * C)), a["atty"][l].reshape((B, T, C)),
                                    a["att_lse"][l], NH)
            cuda.matmul_backward(a["dln"], gl["attn.c_attn.weight"][l], gl["attn.c_attn.bias"][l], a["dqkv"],
                                 a["ln1"][l], pl["attn.c_attn.weight"][l])
            cuda.layernorm_backward(dres, gl["ln_1.weight"][l], gl["ln_1.bias"][l], a["dln"], residual,
                                    pl["ln_1.weight"][l], a["ln1_mean"][l], a["ln1_rstd"][l])
        cuda.embedding_backward(g["wte"], g["wpe"], dres.reshape((B, T, C)), a["idx"])

    # ---- inference ---------------------------------------------------------------------------------------

    def kv_cache(self, batch_size: int, weights="float32", max_len: int | None = None) -> CudaKVCache:
        """A GPU key/value cache for `batch_size` sequences of up to block_size tokens (GPT.kv_cache's twin).
        `weights` (GPT.kv_cache's CPU bf16-decode option) is accepted and ignored: on the GPU the model's
        `dtype` decides."""
        del weights
        return CudaKVCache(self, batch_size, max_len)


class CudaAdamW:
    """optim.AdamW on the GPU: the same update, per-tensor weight decay (model.decays) and state, with m, v in
    one float32 allocation; the update also writes the model's compute copy (bf16) so the next forward reads it.

    >>> opt = gpu.optimizer(lr=6e-4, weight_decay=0.1)
    >>> opt.step(lr, grad_scale=clip / accum)
    """

    def __init__(self, model: CudaGPT, lr: float = 6e-4, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1):
        if lr < 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"bad AdamW hyper-parameters lr={lr} betas={betas} eps={eps} wd={weight_decay}")
        self.model = model
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        n = model.num_parameters
        self.state = cuda.zeros((2 * n,), "float32")
        self.m, self.v = self.state.view(0, (n,)), self.state.view(n, (n,))
        self.t = 0
        # runs of consecutive tensors with the same decay flag: one launch per run instead of one per tensor
        self._groups: list[tuple[int, int, bool]] = []
        off = 0
        for name, shape in model.shapes.items():
            n_el, d = math.prod(shape), decays(name)
            if self._groups and self._groups[-1][2] == d and self._groups[-1][0] + self._groups[-1][1] == off:
                o, k, _ = self._groups[-1]
                self._groups[-1] = (o, k + n_el, d)
            else:
                self._groups.append((off, n_el, d))
            off += n_el

    def step(self, lr: float | None = None, grad_scale: float = 1.0) -> None:
        self.t += 1
        lr = self.lr if lr is None else lr
        mdl = self.model
        mdl._ensure_grads()
        copy = mdl.cparams if mdl.cparams is not mdl.params else None
        for off, n, d in self._groups:
            cuda.adamw_step(mdl.params.view(off, (n,)), mdl.grads.view(off, (n,)), self.m.view(off, (n,)),
                            self.v.view(off, (n,)), lr=lr, t=self.t, beta1=self.betas[0], beta2=self.betas[1],
                            eps=self.eps, weight_decay=self.weight_decay if d else 0.0, grad_scale=grad_scale,
                            params_copy=None if copy is None else copy.view(off, (n,)))


class CudaKVCache(KVCacheBase):
    """GPU keys and values of every layer for B sequences (dtype of the model's compute copy), with
    model.KVCache's interface: prefill(rows) runs the prompts (lengths may differ) batched over their common
    length, then each longer tail; decode(tokens) appends one token per sequence; both return float32 numpy
    logits (B, V) of each sequence's last token (a small gemm of the last hidden state with wte, copied back).
    Memory: 2 * n_layer * B * max_len * n_embd elements (max_len defaults to block_size)."""

    def __init__(self, model: CudaGPT, batch_size: int, max_len: int | None = None):
        cfg = model.config
        self.model, self.B = model, batch_size
        self.max_len = cache_length(cfg, batch_size, max_len)
        L, NH, Tm = cfg.n_layer, cfg.n_head, self.max_len
        self.hs = cfg.n_embd // NH
        self.k = cuda.zeros((L, batch_size, NH, Tm, self.hs), model.dtype)
        self.v = cuda.zeros((L, batch_size, NH, Tm, self.hs), model.dtype)
        self.pos = np.zeros(batch_size, np.int32)  # tokens cached per sequence (host copy; uploaded per call)
        self._pos_dev = cuda.empty((batch_size,), "int32")
        self._bufs: dict[tuple[int, int], dict] = {}

    def _buffers(self, b: int, Tn: int) -> dict:
        key = (b, Tn)
        if key not in self._bufs:
            if len(self._bufs) >= 4:  # prompts of many lengths: keep the decode buffers, drop the others
                self._bufs = {k: v for k, v in self._bufs.items() if k[1] == 1}
            m, cfg = self.model, self.model.config
            C, N, dt = cfg.n_embd, b * Tn, m.dtype
            self._bufs[key] = {
                "idx": cuda.empty((b, Tn), "int32"), "x": cuda.empty((N, C), dt), "h": cuda.empty((N, C), dt),
                "mean": cuda.empty((N,), "float32"), "rstd": cuda.empty((N,), "float32"),
                "qkv": cuda.empty((N, 3 * C), dt), "y": cuda.empty((N, C), dt), "tmp": cuda.empty((N, C), dt),
                "fch": cuda.empty((N, 4 * C), dt), "fch_gelu": cuda.empty((N, 4 * C), dt),
                "last": cuda.empty((b, C), dt), "lnf": cuda.empty((b, C), dt),
                "lnf_mean": cuda.empty((b,), "float32"), "lnf_rstd": cuda.empty((b,), "float32"),
                "logits": cuda.empty((b, cfg.vocab_size), "float32"),
            }
        return self._bufs[key]

    def _forward(self, idx: np.ndarray, r0: int) -> np.ndarray:
        """Run idx (b, Tn) for the cache rows r0 .. r0+b-1, appending their keys/values; logits of the last
        token of each row."""
        m, cfg = self.model, self.model.config
        pc, pl, eps = m.pc, m._pcl, cfg.layernorm_eps
        b, Tn = idx.shape
        C, NH, Tm, hs = cfg.n_embd, cfg.n_head, self.max_len, self.hs
        pos = self.pos[r0:r0 + b]
        if idx.min() < 0 or idx.max() >= cfg.vocab_size:
            raise ValueError(f"token ids outside [0, {cfg.vocab_size})")
        if int(pos.max()) + Tn > Tm:
            raise ValueError(f"the sequence would exceed the cache length max_len={Tm}")
        u = self._buffers(b, Tn)
        u["idx"].copy_(np.ascontiguousarray(idx, np.int32))
        pos_dev = self._pos_dev.view(r0, (b,))
        pos_dev.copy_(np.ascontiguousarray(pos))
        x = u["x"]
        # token + position embedding; the position rows start at each sequence's pos (a view of wpe)
        if (pos == pos[0]).all():
            cuda.embedding_forward(x.reshape((b, Tn, C)), u["idx"], pc["wte"], pc["wpe"].view(int(pos[0]) * C, (Tn, C)))
        else:
            for i in range(b):
                cuda.embedding_forward(x.view(i * Tn * C, (1, Tn, C)), u["idx"].view(i * Tn, (1, Tn)), pc["wte"],
                                       pc["wpe"].view(int(pos[i]) * C, (Tn, C)))
        per_layer = self.B * NH * Tm * hs
        for l in range(cfg.n_layer):
            kc = self.k.view(l * per_layer + r0 * NH * Tm * hs, (b, NH, Tm, hs))
            vc = self.v.view(l * per_layer + r0 * NH * Tm * hs, (b, NH, Tm, hs))
            cuda.layernorm_forward(u["h"], u["mean"], u["rstd"], x, pl["ln_1.weight"][l], pl["ln_1.bias"][l], eps)
            cuda.matmul_forward(u["qkv"], u["h"], pl["attn.c_attn.weight"][l], pl["attn.c_attn.bias"][l])
            cuda.attention_kv_forward(u["y"].reshape((b, Tn, C)), kc, vc, u["qkv"].reshape((b, Tn, 3 * C)), pos_dev)
            cuda.matmul_forward(u["tmp"], u["y"], pl["attn.c_proj.weight"][l], pl["attn.c_proj.bias"][l])
            cuda.add_(x, u["tmp"])
            cuda.layernorm_forward(u["h"], u["mean"], u["rstd"], x, pl["ln_2.weight"][l], pl["ln_2.bias"][l], eps)
            if m.fuse_gelu:
                cuda.matmul_forward(u["fch_gelu"], u["h"], pl["mlp.c_fc.weight"][l], pl["mlp.c_fc.bias"][l],
                                    pre_gelu=u["fch"])
            else:
                cuda.matmul_forward(u["fch"], u["h"], pl["mlp.c_fc.weight"][l], pl["mlp.c_fc.bias"][l])
                cuda.gelu_forward(u["fch_gelu"], u["fch"])
            cuda.matmul_forward(u["tmp"], u["fch_gelu"], pl["mlp.c_proj.weight"][l], pl["mlp.c_proj.bias"][l])
            cuda.add_(x, u["tmp"])
        if Tn == 1:
            last = x
        elif b == 1:
            last = x.view((Tn - 1) * C, (1, C))
        else:
            last = u["last"]
            for i in range(b):
                last.view(i * C, (1, C)).copy_(x.view(((i + 1) * Tn - 1) * C, (1, C)))
        cuda.layernorm_forward(u["lnf"], u["lnf_mean"], u["lnf_rstd"], last, pc["ln_f.weight"], pc["ln_f.bias"], eps)
        cuda.gemm(u["logits"], u["lnf"], pc["wte"], trans_b=True)  # (b, V) fp32 = lnf @ wte^T
        self.pos[r0:r0 + b] += Tn
        return u["logits"].numpy()
