"""Generation: KV-cache logits equal the full forward, greedy = argmax, sampling frequencies match the filtered
softmax (chi-square), seeds, batched prompts of different lengths, streaming text, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fastllm import _C, backend, ops
from fastllm.model import GPT, MODERN, GPTConfig
from fastllm.sample import (
    SamplingParams,
    StopStrings,
    TextStreamer,
    generate,
    probabilities,
    sample_next,
    stream,
    stream_text,
)
from fastllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    m = GPT(GPTConfig(block_size=40, vocab_size=53, n_layer=2, n_head=4, n_embd=32), seed=3)
    m.p["wte"] *= 20  # sharper distributions, so that greedy paths are unambiguous
    return m.eval()


def test_kv_cache_logits_equal_full_forward(model, threads):
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 53, 30)
    cache = model.kv_cache(1)
    logits = cache.prefill([list(seq[:7])])
    for t in range(7, 30):
        full = model.forward(seq[None, :t])[0, -1]
        # fp32, different summation order: |diff| <= 1e-4 relative to the logit scale
        np.testing.assert_allclose(logits[0], full, rtol=1e-4, atol=1e-4 * np.abs(full).max())
        logits = cache.decode([seq[t]])


def test_batched_prompts_of_different_lengths(model):
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    batch = generate(model, prompts, 8, temperature=0)
    for p, out in zip(prompts, batch):
        assert out == generate(model, p, 8, temperature=0)


def test_batched_prefill_logits_equal_full_forward(model):
    """Prefill runs the common prefix of all prompts in one pass, then the longer prompts' tails one by one;
    every row's logits (and the decode step after it) must equal that prompt's own full forward."""
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 53, n)) for n in (5, 3, 9, 3)]
    cache = model.kv_cache(len(prompts))
    logits = cache.prefill(prompts)
    nxt = rng.integers(0, 53, len(prompts))
    after = cache.decode(nxt)
    for b, p in enumerate(prompts):
        for got, seq in ((logits[b], p), (after[b], p + [nxt[b]])):
            full = model.forward(np.array([seq]))[0, -1]
            np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-4 * np.abs(full).max())
    assert list(cache.pos) == [6, 4, 10, 4]
    with pytest.raises(ValueError, match="prompt 1"):
        model.kv_cache(2).prefill([[1, 2], [1, 99]])


def test_short_cache_equals_full_cache(model):
    """max_len sizes the cache (generate uses longest prompt + max_new_tokens): same logits as a full-context
    cache, and a clear error past its end."""
    prompts = [[1, 2, 3], [4, 5]]
    full, short = model.kv_cache(2), model.kv_cache(2, max_len=6)
    assert short.k.shape[3] == 6 and full.k.shape[3] == model.config.block_size
    a, b = full.prefill(prompts), short.prefill(prompts)
    np.testing.assert_array_equal(a, b)
    for t in range(3):
        a, b = full.decode([t, t + 1]), short.decode([t, t + 1])
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="max_len=6"):
        short.decode([0, 0])  # row 0 is at 6 already
    with pytest.raises(ValueError, match="max_len must be"):
        model.kv_cache(1, max_len=model.config.block_size + 1)


def test_bf16_long_prefill_and_cpu_bf16_model(model):
    """A prefill of more than BF16_MAX_ROWS rows with weights="bfloat16" runs the bf16 GEMM on the fp32 weights where
    the CPU has bf16 hardware (the AMX model of the tiles counts: within bf16 rounding of fp32, and not fp32), the
    fp32 GEMM elsewhere; a CPU model in bfloat16 decodes with the snapshot by itself, and its cache's logits follow
    its own full forward (bf16 matmuls) within bf16 rounding."""
    rng = np.random.default_rng(5)
    prompt = [int(t) for t in rng.integers(0, 53, 36)]  # 36 rows > 32
    l32 = model.kv_cache(1).prefill([prompt])
    if not backend.cpu_bf16_hardware():  # the fp32 GEMM: the same logits
        np.testing.assert_array_equal(l32, model.kv_cache(1, weights="bfloat16").prefill([prompt]))
    _C.set_amx_emulation(True)
    try:
        l16 = model.kv_cache(1, weights="bfloat16").prefill([prompt])
    finally:
        _C.set_amx_emulation(False)
    assert np.abs(l16 - l32).max() <= 2e-2 * np.abs(l32).max() and not np.array_equal(l16, l32)
    m16 = GPT(model.config, init=False, dtype="bfloat16").load_state_dict(model.state_dict()).eval()
    cache = m16.kv_cache(1)
    assert cache.snapshot is not None  # the snapshot, without weights="bfloat16"
    logits = [cache.prefill([prompt[:30]])] + [cache.decode([t]) for t in prompt[30:]]
    full = m16.forward(np.array([prompt]))[0, 29:]
    np.testing.assert_allclose(np.array(logits)[:, 0], full, rtol=0, atol=2e-2 * np.abs(full).max())
    assert generate(m16, prompt[:5], 4, temperature=0) == generate(model, prompt[:5], 4, temperature=0,
                                                                   weights="bfloat16")


def test_bf16_weights_decode(model):
    """weights="bfloat16": decode steps use bf16 copies of the matrices (a prefill over 32 rows: the bf16 GEMM).
    The logits stay within bf16 rounding of the float32 cache, and the weights are a snapshot."""
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, 53, 4)) for _ in range(3)]
    c32, c16 = model.kv_cache(3), model.kv_cache(3, weights="bfloat16")
    l32, l16 = c32.prefill(prompts), c16.prefill(prompts)  # 12 rows: bf16 already
    for _ in range(6):
        scale = np.abs(l32).max()
        assert np.abs(l16 - l32).max() <= 2e-2 * scale
        assert not np.array_equal(l16, l32)  # really a different (bf16) path
        nxt = l32.argmax(1)
        l32, l16 = c32.decode(nxt), c16.decode(nxt)
    w16 = model.bf16_weights()
    wte = w16["wte"]  # packed for the bf16 GEMM where that runs on AVX512_BF16, else the bits as they are
    assert isinstance(wte, ops.Bf16Panels) == ops.bf16_panels_preferred()
    np.testing.assert_array_equal(ops.unpack_bf16(wte) if isinstance(wte, ops.Bf16Panels) else wte,
                                  ops.to_bf16(model.p["wte"]))
    assert generate(model, prompts[0], 5, temperature=0, weights=w16) == \
        generate(model, prompts[0], 5, temperature=0, weights="bfloat16")
    with pytest.raises(ValueError, match="weights must be"):
        model.kv_cache(1, weights="float16")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_panels_decode_as_the_rows(arch, simd_bf16):
    """A bf16 snapshot packed for the bf16 GEMM (ops.Bf16Panels) is the same model as the bits row-major: a prefill
    of 30 rows and decode steps of 1-3 rows give the same logits at every SIMD level, within fp32 summation order
    (which may flip the bf16 rounding of a later layer's input: 2e-3 of the largest logit; bf16 vs fp32 is ~2e-2);
    so does a 36-token prompt where the CPU has bf16 hardware (on rows it runs the bf16 GEMM on the fp32 weights,
    elsewhere the fp32 GEMM: the panels always compute in bf16)."""
    extra = dict(MODERN, mlp="swiglu", n_kv_head=2) if arch == "llama" else {}
    m = GPT(GPTConfig(block_size=48, vocab_size=61, n_layer=2, n_head=4, n_embd=64, **extra), seed=5).eval()
    names = (*m.bf16_weights(),)
    rows = {n: ops.to_bf16(m.p[n]) for n in names}
    panels = {n: ops.pack_bf16(m.p[n]) for n in names}
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 61, 10)) for _ in range(3)]
    a, b = m.kv_cache(3, weights=rows), m.kv_cache(3, weights=panels)
    la, lb = a.prefill(prompts), b.prefill(prompts)
    for _ in range(4):
        np.testing.assert_allclose(lb, la, rtol=0, atol=2e-3 * np.abs(la).max())
        nxt = la.argmax(1)
        la, lb = a.decode(nxt), b.decode(nxt)
    np.testing.assert_allclose(b.decode_rows(nxt[:1]), a.decode_rows(nxt[:1]), rtol=0, atol=2e-3 * np.abs(la).max())
    if backend.cpu_bf16_hardware():
        long = list(rng.integers(0, 61, 36))
        la, lb = a.prefill_row(2, long[:10]), b.prefill_row(2, long[:10])
        for c in (a, b):
            c.reset_row(2)
        np.testing.assert_allclose(b.prefill_row(2, long), a.prefill_row(2, long), rtol=0,
                                   atol=2e-3 * np.abs(la).max())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_int8_weights_equal_the_dequantized_model(arch, threads):
    """weights="int8": every pass (a 36-token prefill: blockwise dequantization + the fp32 GEMM; decode steps and
    short prompts: the few-rows int8 kernels) computes the model whose matrices are q * scale, exactly: its float32
    full forward is the oracle (fp32 summation order only). The quantized model stays close to float32 (int8 noise),
    and generate/kv_cache take the reusable snapshot model.int8_weights()."""
    extra = dict(MODERN, mlp="swiglu", n_kv_head=2) if arch == "llama" else {}
    cfg = GPTConfig(block_size=48, vocab_size=61, n_layer=2, n_head=4, n_embd=64, tie_embeddings=False, **extra)
    m = GPT(cfg, seed=4).eval()
    w8 = m.int8_weights()
    assert w8["lm_head.weight"].q.dtype == np.int8
    assert w8["mlp.c_fc.weight"].scale.shape == m.p["mlp.c_fc.weight"].shape[:2]
    deq = GPT(cfg, init=False).load_state_dict(m.state_dict()).eval()
    for name, w in w8.items():
        deq.p[name][...] = ops.dequantize_int8(w)
    rng = np.random.default_rng(6)
    seq = rng.integers(0, 61, 44)
    full, full32 = deq.forward(seq[None])[0], m.forward(seq[None])[0]
    cache = m.kv_cache(1, weights="int8")
    logits = [cache.prefill([list(seq[:36])])[0]] + [cache.decode([t])[0] for t in seq[36:43]]
    scale = np.abs(full).max()
    np.testing.assert_allclose(np.array(logits), full[35:43], rtol=0, atol=1e-4 * scale)
    assert 0 < np.abs(np.array(logits) - full32[35:43]).max() <= 5e-2 * scale  # int8, not fp32
    rows = [list(seq[:3]), list(seq[5:12])]  # batched prompts of different lengths, few rows
    assert generate(m, rows, 5, temperature=0, weights=w8) == generate(deq, rows, 5, temperature=0) == \
        generate(m, rows, 5, temperature=0, weights="int8")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_w8a8_weights_decode_as_one_prompt(arch, threads):
    """weights="w8a8" (int8 weights and activations, model.w8a8_weights): a row's matmuls depend on that row alone
    (exact integer sums), so a prompt run in one prefill and the same tokens fed as a shorter prefill plus decode
    steps give the same logits (fp32 attention's summation order only); close to float32 (int8 noise on both
    operands), and not equal to it; the snapshot holds int8_weights' quantization, packed; batched generation of
    prompts of different lengths equals each prompt alone, and the reusable snapshot equals the string."""
    extra = dict(MODERN, mlp="swiglu", n_kv_head=2) if arch == "llama" else {}
    cfg = GPTConfig(block_size=48, vocab_size=61, n_layer=2, n_head=4, n_embd=64, tie_embeddings=False, **extra)
    m = GPT(cfg, seed=4).eval()
    w = m.w8a8_weights()
    w8 = m.int8_weights()
    for name, p in w.items():
        np.testing.assert_array_equal(ops.unpack_int8(p).q, w8[name].q)
    seq = np.random.default_rng(6).integers(0, 61, 44)
    full32 = m.forward(seq[None])[0]
    one = m.kv_cache(1, weights=w).prefill([list(seq[:43])])[0]
    cache = m.kv_cache(1, weights="w8a8")
    logits = [cache.prefill([list(seq[:36])])[0]] + [cache.decode([t])[0] for t in seq[36:43]]
    scale = np.abs(full32).max()
    np.testing.assert_allclose(logits[-1], one, rtol=0, atol=1e-5 * scale)
    assert 0 < np.abs(np.array(logits) - full32[35:43]).max() <= 5e-2 * scale
    rows = [list(seq[:3]), list(seq[5:12])]
    batched = generate(m, rows, 5, temperature=0, weights=w)
    assert batched == [generate(m, [r], 5, temperature=0, weights=w)[0] for r in rows]
    assert batched == generate(m, rows, 5, temperature=0, weights="w8a8")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoding_runs_every_pass_on_the_snapshot(arch):
    """model.decoding(weights): forward (logits and losses, all positions at once) and generate compute what the
    snapshot computes -- int8: the dequantized model's numbers; w8a8: the KV cache's logits, step by step -- and
    outside the block the float32 model again; no training inside."""
    extra = dict(MODERN, mlp="swiglu", n_kv_head=2) if arch == "llama" else {}
    cfg = GPTConfig(block_size=48, vocab_size=61, n_layer=2, n_head=4, n_embd=64, tie_embeddings=False, **extra)
    m = GPT(cfg, seed=4).eval()
    deq = GPT(cfg, init=False).load_state_dict(m.state_dict()).eval()
    w8 = m.int8_weights()
    for name, w in w8.items():
        deq.p[name][...] = ops.dequantize_int8(w)
    rng = np.random.default_rng(7)
    seq = rng.integers(0, 61, (2, 44))
    targets = rng.integers(0, 61, (2, 44))
    full32 = m.forward(seq)
    scale = np.abs(full32).max()
    with m.decoding(w8):
        np.testing.assert_allclose(m.forward(seq), deq.forward(seq), rtol=0, atol=1e-4 * scale)
        assert m.forward(seq, targets) == pytest.approx(deq.forward(seq, targets), abs=1e-5)
        rows = [list(seq[0, :3]), list(seq[1, :9])]
        assert generate(m, rows, 5, temperature=0) == generate(deq, rows, 5, temperature=0)
    with m.decoding("w8a8"):
        logits = m.forward(seq[:1])[0]
        cache = m.kv_cache(1)  # the default weights inside: the block's snapshot
        steps = [cache.prefill([list(seq[0, :36])])[0]] + [cache.decode([t])[0] for t in seq[0, 36:43]]
        np.testing.assert_allclose(np.array(steps), logits[35:43], rtol=0, atol=1e-5 * scale)
        z = logits.astype(np.float64)
        ce = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(44), targets[0]]
        assert m.forward(seq[:1], targets[:1]) == pytest.approx(ce.mean(), abs=1e-5)
        assert 0 < np.abs(logits - full32[0]).max() <= 5e-2 * scale
        m.train()
        with pytest.raises(RuntimeError, match="for inference"):
            m.forward(seq, targets)
        m.eval()
    np.testing.assert_array_equal(m.forward(seq), full32)


def test_greedy_is_argmax_of_full_forward(model):
    out = generate(model, [7, 8], 12, temperature=0)
    for t in range(2, len(out)):
        assert out[t] == int(np.argmax(model.forward(np.array(out[:t])[None])[0, -1]))
    assert generate(model, [7, 8], 12, temperature=1.0, top_k=1, seed=5) == out
    assert generate(model, [7, 8], 12, temperature=1e-6, seed=5) == out


def test_same_seed_same_text_different_seed_different_text(model):
    a = generate(model, [1], 30, temperature=1.5, seed=1)
    assert a == generate(model, [1], 30, temperature=1.5, seed=1)
    assert a != generate(model, [1], 30, temperature=1.5, seed=2)


@pytest.mark.parametrize("sp", [SamplingParams(1.0), SamplingParams(0.7, top_k=4), SamplingParams(1.3, top_p=0.8),
                                SamplingParams(1.0, min_p=0.1)])
def test_sampling_frequencies_chi_square(sp):
    from scipy import stats

    logits = np.array([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    z = logits[0] / sp.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if sp.top_k:
        p[np.argsort(-p)[sp.top_k:]] = 0
    if sp.top_p:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < sp.top_p
        p[order[~keep]] = 0
    if sp.min_p:
        p[p < sp.min_p * p.max()] = 0
    p /= p.sum()
    np.testing.assert_allclose(probabilities(logits, sp)[0], p, rtol=1e-6, atol=1e-12)  # (exp in float32)
    rng = np.random.default_rng(42)
    n = 20000
    draws = np.concatenate([sample_next(np.repeat(logits, 1000, 0), rng, sp) for _ in range(n // 1000)])
    counts = np.bincount(draws, minlength=8)
    assert counts[p == 0].sum() == 0  # filtered tokens are never drawn
    keep = p > 0
    chi2, pval = stats.chisquare(counts[keep], n * p[keep])
    assert pval > 1e-3, (counts, n * p)


def reference_draw(logits: np.ndarray, u: np.ndarray, sp: SamplingParams) -> np.ndarray:
    """What sample_next draws for uniforms u, written the direct way: a full stable sort for top-p, one cumulative
    sum over the whole vocabulary."""
    z = logits.astype(np.float64) / sp.temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if sp.top_p is not None:
        order = np.argsort(-p, axis=-1, kind="stable")
        q = np.take_along_axis(p, order, -1)
        keep = np.zeros(p.shape, bool)
        np.put_along_axis(keep, order, np.cumsum(q, -1) - q < sp.top_p, -1)
        p = np.where(keep, p, 0.0)
    p /= p.sum(-1, keepdims=True)
    return np.minimum((np.cumsum(p, -1) < u[:, None]).sum(-1), p.shape[-1] - 1)


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "all equal"])
def test_nucleus_and_draw_equal_a_full_sort(kind):
    """Top-p sorts only the most likely tokens when that decides the nucleus (fastllm.sample._nucleus); the tokens
    drawn are those of a full sort and one cumulative sum, on nuclei inside and beyond its first 256 tokens."""
    rng = np.random.default_rng(len(kind))
    for V in (3, 300, 5000):
        logits = {"peaked": rng.standard_normal((4, V)) * 5, "flat": rng.standard_normal((4, V)) * 0.3,
                  "ties": np.round(rng.standard_normal((4, V)) * 2), "all equal": np.zeros((4, V))}[kind]
        logits = logits.astype(np.float32)
        for top_p in (1e-6, 0.3, 0.9, 0.999):
            sp = SamplingParams(0.9, top_p=top_p)
            for seed in range(5):
                u = np.random.default_rng(seed).random(4)
                got = sample_next(logits, np.random.default_rng(seed), sp)
                np.testing.assert_array_equal(got, reference_draw(logits, u, sp))


def test_stop_tokens_and_streaming(model):
    out = generate(model, [1, 2], 20, temperature=0)
    stop = out[5]
    steps = list(stream(model, [1, 2], 20, temperature=0, stop_tokens=[stop]))
    assert [int(s[0]) for s in steps] == out[2:out.index(stop, 2) + 1]


def test_text_streamer_pieces_join_to_the_whole_decode():
    """Streamed pieces join to tokenizer.decode of all the ids, whatever bytes the tokens hold: a character split
    across tokens after bytes that are not UTF-8 (b"\\xefor" then the three bytes of "你") used to come out as
    three U+FFFD (the streamer gave up holding bytes once its buffer did not decode), and bad bytes were held back."""
    tok = Tokenizer({bytes([b]): b for b in range(256)})
    streamer = TextStreamer(tok)
    pieces = [streamer.push(b) for b in b"\xefor\xe4\xbd\xa0"] + [streamer.flush()]
    assert pieces == ["", "\ufffdo", "r", "", "", "\u4f60", ""]
    rng = np.random.default_rng(0)
    chars = ["a", " ", "é", "你", "👍", "\ufffd"]
    for _ in range(200):  # valid characters, cut anywhere, among stray bytes
        data = b"".join(bytes(rng.integers(128, 256, 1)) if rng.random() < 0.2 else
                        chars[rng.integers(len(chars))].encode() for _ in range(rng.integers(1, 12)))
        for ids in ([*data], [*data[:-1]]):
            streamer = TextStreamer(tok)
            text = "".join(streamer.push(t) for t in ids)
            assert text + streamer.flush() == tok.decode(ids)


def scripted_stream(tokens):
    """A stand-in for fastllm.sample.stream that 'generates' `tokens` (ending at a stop token, as stream does)."""
    def fake(model, ids, max_new_tokens, stop_tokens=(), **kw):
        for t in tokens[:max_new_tokens]:
            yield np.array([t])
            if t in stop_tokens:
                return
    return fake


def test_stream_text_skips_special_tokens_as_transformers_pipelines(monkeypatch):
    """stream_text leaves special tokens the model writes out of its text by default (transformers' text-generation
    pipeline decodes with skip_special_tokens=True, vLLM too) but not HF's non-special added tokens; stop strings
    are found in the text shown (as vLLM finds them). TextStreamer keeps them by default (as transformers'
    TextStreamer does) and, skipping, keeps the ones named in `keep`."""
    import fastllm.sample

    tok = Tokenizer({bytes([b]): b for b in range(256)},
                    special_tokens={"<|endoftext|>": 256, "<|im_start|>": 257, "<tool_call>": 258})
    tok._set_hf_options(plain_tokens=["<tool_call>"])
    assert tok.special_ids == {256, 257}
    # "é" split by a special token: skipped, its two bytes join
    ids = [*b"a\xc3", 257, *b"\xa9b", 258, *b"c", 257, 256, *b"never"]
    monkeypatch.setattr(fastllm.sample, "stream", scripted_stream(ids))
    shown = "".join(stream_text(None, tok, [1], 20))
    assert shown == "aéb<tool_call>c" == tok.decode(ids[:-6], skip_special_tokens=True)
    kept = "".join(stream_text(None, tok, [1], 20, skip_special_tokens=False))
    assert kept == "a\ufffd<|im_start|>\ufffdb<tool_call>c<|im_start|>" == tok.decode(ids[:-6])
    monkeypatch.setattr(fastllm.sample, "stream", scripted_stream([*b"xx", 257, *b"yz"]))
    assert "".join(stream_text(None, tok, [1], 20, stop="xy")) == "x"
    assert "".join(stream_text(None, tok, [1], 20, stop="xy", skip_special_tokens=False)) == "xx<|im_start|>yz"
    streamer = TextStreamer(tok)
    assert "".join(streamer.push(t) for t in ids) == tok.decode(ids)
    streamer = TextStreamer(tok, skip_special_tokens=True, keep=["<|im_start|>"])
    assert "".join(streamer.push(t) for t in [*b"x", 257, 256, *b"y"]) == "x<|im_start|>y"


def test_stop_strings_across_pieces_and_one_stop_as_a_str():
    """Stop strings are found across pieces, text that may still become one is held back, and a str is one stop
    string (as OpenAI's `stop`): stop="END" used to stop at the first "E", "N" or "D"."""
    s = StopStrings(["END", "\n\n"])
    assert [s.push(x) for x in ("an E", "ND", "no")] == [("an ", False), ("", True), ("", True)]
    s = StopStrings("END")
    assert [s.push(x) for x in ("Done. E", "N", "Dx")] == [("Done. ", False), ("", False), ("", True)]
    s = StopStrings("END")
    assert [s.push("ENTER DEN"), s.push("E"), s.flush()] == [("ENTER D", False), ("EN", False), "E"]


def test_stop_strings_kept_and_unchecked_pieces():
    """include=True (vLLM's include_stop_str_in_output): the stop string stays, the rest of its piece goes, nothing
    is held back; check=False (vLLM's min_tokens): a stop string inside unchecked text does not stop, one that
    ends after it does, where it starts; `hit` names the stop string found."""
    s = StopStrings(["END", "\n\n"], include=True)
    assert [s.push(x) for x in ("an E", "NDx", "no")] == [("an E", False), ("ND", True), ("", True)]
    assert s.hit == "END"
    s = StopStrings("l")
    assert [s.push(x, check=False) for x in "hél"] == [("h", False), ("é", False), ("l", False)]
    assert s.push("lo") == ("", True) and s.hit == "l"  # "hél": the first "l" was unchecked
    s = StopStrings("ab")
    assert [s.push("xab", check=False), s.push("a", check=False), s.push("bc")] == [("xab", False), ("", False),
                                                                                   ("", True)]
    s = StopStrings("ab", include=True)
    assert [s.push("xa", check=False), s.push("bc")] == [("xa", False), ("b", True)]
    assert StopStrings("x").hit is None


@pytest.mark.parametrize("kw", [dict(presence_penalty=3.0), dict(frequency_penalty=1.5),
                                dict(presence_penalty=-2.0, frequency_penalty=0.5, temperature=0.7, seed=4)])
def test_presence_and_frequency_penalties(model, kw):
    """generate takes OpenAI's presence/frequency penalties (SamplingParams had them, generate refused them): each
    step's token is drawn from the full forward's logits minus the penalties counted over the new tokens only (the
    prompt's tokens are not penalized)."""
    kw = {"temperature": 0.0, **kw}
    prompt = [7, 8, 7]
    out = generate(model, prompt, 15, **kw)
    rng = np.random.default_rng(kw.get("seed"))
    sp = SamplingParams(kw["temperature"], presence_penalty=kw.get("presence_penalty", 0.0),
                        frequency_penalty=kw.get("frequency_penalty", 0.0))
    for t in range(len(prompt), len(out)):
        logits = model.forward(np.array(out[:t])[None])[0, -1:]
        assert out[t] == sample_next(logits, rng, sp, output=[out[len(prompt):t]])[0]
    new = generate(model, prompt, 15, temperature=0, presence_penalty=100.0)[len(prompt):]
    assert len(set(new)) == 15 and len(set(generate(model, prompt, 15, temperature=0)[len(prompt):])) < 15


def test_repetition_penalty_changes_greedy_path(model):
    plain = generate(model, [1, 2], 20, temperature=0)
    pen = generate(model, [1, 2], 20, temperature=0, repetition_penalty=5.0)
    assert len(set(pen[2:])) >= len(set(plain[2:]))


@pytest.mark.parametrize("kw,match", [
    (dict(prompt_ids=[]), "empty"),
    (dict(prompt_ids=list(range(39)), max_new_tokens=5), "block_size"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(prompt_ids=[1, 53]), "token id 53"),
    (dict(top_k=True), "top_k"),
])
def test_bad_input(model, kw, match):
    args = dict(prompt_ids=[1, 2], max_new_tokens=3)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


def test_argument_types(model):
    """max_new_tokens must be an integer (2.5 was a TypeError from range(), None one from a comparison); a float top_k
    that is an integer is that integer (2.0 reached np.partition: "Partition index must be integer"); stop_tokens may
    be one id or None, as HF's eos_token_id (5 was "'int' object is not iterable")."""
    for n in (2.5, None, "3"):
        with pytest.raises(TypeError, match="max_new_tokens must be an integer"):
            generate(model, [1, 2], n)
    assert generate(model, [1, 2], 6, top_k=2.0, seed=0) == generate(model, [1, 2], 6, top_k=2, seed=0)
    out = generate(model, [1, 2], 20, temperature=0)
    assert generate(model, [1, 2], 20, temperature=0, stop_tokens=np.int64(out[4])) == out[:out.index(out[4], 2) + 1]
    assert generate(model, [1, 2], 20, temperature=0, stop_tokens=None) == out
    with pytest.raises(TypeError, match="stop_tokens"):
        generate(model, [1, 2], 3, stop_tokens="5")


def test_prompts_as_torch_tensors(model):
    """A 1-D torch tensor (a row of HF's input_ids) is one prompt, as a list or a numpy array is: it used to be read
    as a batch of one-token prompts (iterating it gives 0-d tensors, not ints); a 2-D one is a batch."""
    torch = pytest.importorskip("torch")
    want = generate(model, [1, 2, 3], 4, temperature=0)
    assert generate(model, torch.tensor([1, 2, 3]), 4, temperature=0) == want
    assert generate(model, list(torch.tensor([1, 2, 3])), 4, temperature=0) == want
    assert generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), 4, temperature=0) == \
        generate(model, [[1, 2, 3], [4, 5, 6]], 4, temperature=0)


def test_non_finite_logits_raise_naming_the_step(model):
    """NaN weights used to make generate return token 0 forever (and `sample` print NUL characters)."""
    bad = GPT(model.config, seed=3).eval()
    bad.p["ln_f.weight"][0] = np.nan
    with pytest.raises(FloatingPointError, match="not finite .* step 0"):
        generate(bad, [1, 2, 3], 5, temperature=0)
    late = GPT(model.config, seed=3).eval()
    late.p["wpe"][5] = np.inf  # position 5: sequence 1 (prompt at 0..2, new tokens at 3, 4, 5) breaks at step 3
    out = []
    with pytest.raises(FloatingPointError, match="step 3 \\(sequence 1\\)"):
        for step in stream(late, [[1, 2], [1, 2, 3]], 5, temperature=0):  # sequence 0 reaches position 5 later
            out.append(step)
    assert len(out) == 3


def test_prompt_filling_the_context(model):
    """A prompt of exactly block_size tokens and no new ones is fine (it used to ask the cache for
    block_size + 1 rows); one more token says what does not fit."""
    prompt = list(range(40))
    assert generate(model, prompt, 0) == prompt
    with pytest.raises(ValueError, match="40 tokens \\+ max_new_tokens=1 > the model's context block_size=40"):
        generate(model, prompt, 1)


def test_seed_must_be_non_negative(model):
    for seed in (-1, 1.5, "0"):
        with pytest.raises(ValueError, match="seed must be an integer >= 0"):
            generate(model, [1], 2, seed=seed)
    assert generate(model, [1], 2, seed=np.int64(3)) == generate(model, [1], 2, seed=3)


def test_chat_session_checks_sampling_options():
    """chat --temperature nan used to fail at every message (and exit 0): ChatSession refuses it at once."""
    from fastllm import Tokenizer
    from fastllm.sft import IM_END, IM_START, ChatSession

    tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|endoftext|>": 256, IM_START: 257,
                                                                        IM_END: 258})
    m = GPT(GPTConfig(block_size=32, vocab_size=259, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="temperature"):
        ChatSession(m, tok, temperature=float("nan"))
    with pytest.raises(ValueError, match="seed"):
        ChatSession(m, tok, seed=-1)
    assert ChatSession(m, tok, temperature=0.5, seed=1).sampling["temperature"] == 0.5
