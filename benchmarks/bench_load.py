"""Loading a downloaded model and decoding from it: peak memory, load time and greedy decode speed, each provider in
a fresh process (the peak resident memory, VmHWM, is the process's own), interleaved over repeats, medians.

The model: a Hugging Face folder of Llama 3.2 1B's shapes (hidden 2048, 16 layers, 32 query / 8 key-value heads,
MLP 8192, vocabulary 128256; untied here, so the lm-head's blockwise conversion is in it) with random BF16 weights,
as the hub ships them, written once into --dir. Providers:
  fastllm fp32        GPT.from_pretrained(folder): float32 weights, decoding in float32
  fastllm bf16 held   GPT.from_pretrained(folder, weights="bfloat16"): matrices held in bf16 alone (inference only)
  fastllm int8 held   ... weights="int8": int8 matrices (per-row scales), float32 activations
  transformers bf16   AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16), generate(do_sample=False)
  transformers fp32   ... dtype=torch.float32
Decode: a 16-token prompt, then --new greedy tokens at batch 1 (tok/s = new / time, prefill included).

    python benchmarks/bench_load.py [--threads 2] [--quick] [--dir /tmp/fastllm_bench_load]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

from common import cli, header, print_table

SHAPE = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0)
QUICK = dict(SHAPE, num_hidden_layers=4, vocab_size=32768)
LOAD = {  # provider -> the code that loads `path` into `model` and defines `decode(prompt, new) -> ids`
    "fastllm fp32": "from fastllm import GPT\nmodel = GPT.from_pretrained(path).eval()",
    "fastllm bf16 held": "from fastllm import GPT\nmodel = GPT.from_pretrained(path, weights='bfloat16')",
    "fastllm int8 held": "from fastllm import GPT\nmodel = GPT.from_pretrained(path, weights='int8')",
    "transformers bf16": "import torch, transformers\n"
                         "model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()",
    "transformers fp32": "import torch, transformers\n"
                         "model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()",
}
DECODE = {
    "fastllm": "def decode(prompt, new):\n    return model.generate([prompt], new, temperature=0)[0]",
    "transformers": "def decode(prompt, new):\n"
                    "    with torch.no_grad():\n"
                    "        return model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,\n"
                    "                              do_sample=False, pad_token_id=0)[0].tolist()",
}


def write_folder(folder: Path, shape: dict) -> None:
    """config.json + model.safetensors (BF16, normal(0, 0.02) matrices, unit norms) of a LlamaForCausalLM, written
    tensor by tensor (no model object: a 1B float32 init would take longer than the benchmark)."""
    import torch
    from safetensors.torch import save_file

    cfg = dict(shape, model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
               tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=None, eos_token_id=None)
    C, H, V, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    gen = torch.Generator().manual_seed(0)

    def w(*s):
        return (torch.randn(*s, generator=gen) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": w(V, C), "model.norm.weight": torch.ones(C, dtype=torch.bfloat16),
               "lm_head.weight": w(V, C)}
    for i in range(L):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": torch.ones(C, dtype=torch.bfloat16),
                        p + "post_attention_layernorm.weight": torch.ones(C, dtype=torch.bfloat16),
                        p + "self_attn.q_proj.weight": w(q, C), p + "self_attn.k_proj.weight": w(kv, C),
                        p + "self_attn.v_proj.weight": w(kv, C), p + "self_attn.o_proj.weight": w(C, q),
                        p + "mlp.gate_proj.weight": w(H, C), p + "mlp.up_proj.weight": w(H, C),
                        p + "mlp.down_proj.weight": w(C, H)})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg))


def measure(provider: str, path: Path, threads: int, new: int) -> dict:
    """One fresh process: load, then decode `new` tokens; its peak memory growth after loading and after decoding
    (a memory-mapped file's pages count once touched: transformers reads bf16 weights in place), load time, tok/s
    and tokens."""
    family = provider.split()[0]
    script = "\n".join([
        "import json, time, os",
        f"os.environ['OMP_NUM_THREADS'] = '{threads}'",
        "def peak():",
        "    return int(next(x for x in open('/proc/self/status') if x.startswith('VmHWM')).split()[1]) * 1024",
        f"path = {str(path)!r}",
        "import numpy, torch",  # (both libraries' own memory is not the model's)
        f"torch.set_num_threads({threads})",
        "import fastllm",
        f"fastllm.set_num_threads({threads})",
        "base = peak()",
        "t0 = time.perf_counter()",
        LOAD[provider],
        "load_s = time.perf_counter() - t0",
        "grew = peak() - base",
        DECODE[family],
        "prompt = list(range(1000, 1016))",
        "decode(prompt, 2)",  # (warm-up: first-call allocations and kernel selection)
        "t0 = time.perf_counter()",
        f"ids = decode(prompt, {new})",
        f"tok_s = {new} / (time.perf_counter() - t0)",
        "print(json.dumps(dict(grew=grew, decoded=peak() - base, load_s=load_s, tok_s=tok_s, ids=ids[16:])))",
    ])
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{provider}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(threads: int = 2, quick: bool = False, dir: str = "/tmp/fastllm_bench_load", new: int = 32) -> None:
    shape, new = (QUICK, min(new, 8)) if quick else (SHAPE, new)
    folder = Path(dir) / ("quick" if quick else "llama-3.2-1b-shape")
    if not (folder / "model.safetensors").exists():
        write_folder(folder, shape)
    C, H, L, V = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    n_params = 2 * V * C + L * (C * (q + 2 * kv) + q * C + 3 * C * H)  # embeddings, lm-head, blocks (not norms)
    print(header("load + decode of a downloaded model (fresh process each)", threads))
    print(f"Llama-shaped folder: {L} layers, hidden {C}, vocab {V}, untied, {n_params / 1e9:.2f}B "
          f"parameters, BF16 file {(folder / 'model.safetensors').stat().st_size / 2**30:.2f} GiB; decode: 16-token "
          f"prompt + {new} greedy tokens at batch 1")
    repeats = 1 if quick else 3
    runs: dict[str, list[dict]] = {p: [] for p in LOAD}
    for _ in range(repeats):  # interleaved
        for provider in LOAD:
            runs[provider].append(measure(provider, folder, threads, new))
    def median(provider: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[provider])

    ref, rows = "transformers bf16", []
    for provider in runs:
        tokens, fp32_tokens = runs[provider][0]["ids"], runs["transformers fp32"][0]["ids"]
        same = sum(a == b for a, b in zip(tokens, fp32_tokens)) / len(fp32_tokens)
        rows.append([provider, f"{median(provider, 'grew') / 2**30:.2f}", f"{median(provider, 'decoded') / 2**30:.2f}",
                     f"{median(provider, 'load_s'):.2f}", f"{median(provider, 'tok_s'):.1f}",
                     f"{median(provider, 'tok_s') / median(ref, 'tok_s'):.2f}x", f"{same:.0%}"])
    print_table(rows, ["provider", "memory after load GiB", "peak after decode GiB", "load s", "decode tok/s",
                       "vs transformers bf16", "same tokens as transformers fp32"])
    print("memory: the process's peak resident memory (VmHWM) less its own before loading (numpy, torch imported)")


if __name__ == "__main__":
    cli(run, __doc__, dir=("folder for the generated model", "/tmp/fastllm_bench_load"),
        new=("greedy tokens decoded", 32))
