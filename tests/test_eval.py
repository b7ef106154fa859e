"""fastllm.eval: scores equal a straightforward transformers reference on the same random GPT-2 weights (multiple
choice, bits per byte with sliding windows, lm-eval loglikelihood / is_greedy / rolling); acc and acc_norm on a
hand-made file with known answers (every multiple-choice format); a model trained here on a learnable toy task
scores far above chance; the lm-evaluation-harness adapter runs local YAML tasks end to end and agrees with our
own tasks; generative exact match and pass@k; resume; TrainEval; the CLI; bad files name file:line and field."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from tiny import EOT, byte_tokenizer, one_thread, supervised_batch, write_jsonl  # noqa: F401 (fixture)

import fastllm
from fastllm.checkpoint import save
from fastllm.cli import main
from fastllm.eval import EvalConfig, TrainEval, evaluate, format_report, load, pass_at_k
from fastllm.eval.data import load_documents, load_multiple_choice
from fastllm.eval.scoring import score_continuations, window_requests
from fastllm.model import GPT, GPTConfig
from fastllm.optim import AdamW
from fastllm.tasks import SortTask
from fastllm.tokenizer import Tokenizer

# ---- against transformers on the same random GPT-2 weights -----------------------------------------------------

T_CTX = 32  # a small context, so that documents and long contexts need windows / truncation


@pytest.fixture(scope="module")
def pydoc_text() -> str:
    import pydoc_data.topics

    t = pydoc_data.topics.topics
    return "\n".join(t[k] for k in sorted(t))[:200_000]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory, pydoc_text):
    """(fastllm model + tokenizer loaded from a HF folder, the same folder in transformers). Random weights with
    sharp distributions (std 0.3), a 400-token BPE trained on Python's docs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.train([pydoc_text], 400, pattern="gpt2", progress=False)
    m = GPT(GPTConfig(block_size=T_CTX, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=32), init=False)
    m.params[:] = np.random.default_rng(0).standard_normal(m.num_parameters).astype(np.float32) * 0.3
    d = tmp_path_factory.mktemp("hf") / "gpt2"
    m.save_pretrained(d, tokenizer=tok)
    model, tok2 = load(d)  # through the loader `fastllm eval --ckpt` uses (HF folder branch)
    hf = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
    torch.set_num_threads(1)
    return model, tok2, hf, d


def ref_logp(hf, ids) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i >= 1, float64, one unpadded sequence through transformers."""
    import torch

    ids = [int(t) for t in ids]
    with torch.no_grad():
        logits = hf(torch.tensor([ids[:-1]])).logits[0].double()
    return torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def ref_continuation(hf, ctx, cont) -> np.ndarray:
    seq = (list(ctx) + list(cont))[-(T_CTX + 1):]
    return ref_logp(hf, seq)[-len(cont):]


def ref_rolling(hf, ids, stride: int) -> float:
    """Summed log p of ids[1:], target j conditioned on ids[start:j] where its chunk of `stride` targets ends at e
    and start = max(0, e - block_size): the definition of the sliding windows, one forward per chunk."""
    n, total = len(ids), 0.0
    for c in range(math.ceil((n - 1) / stride)):
        e = min((c + 1) * stride, n - 1)
        start = max(0, e - T_CTX)
        total += ref_logp(hf, ids[start:e + 1])[-(e - c * stride):].sum()
    return total


def test_multiple_choice_matches_transformers(hf_pair, pydoc_text, tmp_path):
    model, tok, hf, _ = hf_pair
    rng = np.random.default_rng(0)
    words = pydoc_text.split()
    rows = []
    for i in range(24):
        n_ctx = [0, 1, 3, 8, 20, 40][i % 6]  # 40 words: longer than the context, cut on the left
        a = int(rng.integers(0, len(words) - 60))
        ctx = " ".join(words[a:a + n_ctx])
        choices = [" ".join(words[b:b + int(rng.integers(1, 4))]) for b in rng.integers(0, len(words) - 10, 4)]
        ctx += " " * (i % 4 == 1)  # a context ending with a space: lm-eval moves it to the choices
        rows.append({"context": ctx, "choices": choices, "answer": int(rng.integers(0, 4))} if i % 2 else
                    {"ctx": ctx, "endings": choices, "label": int(rng.integers(0, 4))} if i % 3 else
                    {"sentence": f"{ctx} _ {choices[0]}.", "option1": choices[1], "option2": choices[2],
                     "answer": str(1 + i % 4 // 2)})  # Winogrande: a context per option, the rest scored
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    report = evaluate(model, tok, "mc", data=path, batch_tokens=100)  # several examples per forward, padded
    acc, acc_norm = [], []
    examples = load_multiple_choice(path)
    assert sum(len(ex.contexts) == 2 for ex in examples) == 4
    split = 0  # choices whose tokens differ from the context's and the choice's encoded apart
    for ex, rec in zip(examples, report["records"]):
        ref = []
        for c, ch in zip(ex.contexts or [ex.context] * 4, ex.choices):  # lm-eval's _encode_pair
            ctx = tok.encode_ordinary(c.rstrip()).tolist()
            cont = tok.encode_ordinary(c + ch).tolist()[len(ctx):]
            ref.append(ref_continuation(hf, ctx or [tok.eot_token], cont))
            split += cont != tok.encode_ordinary(ch).tolist()
        np.testing.assert_allclose(rec["logprob"], [r.sum() for r in ref], rtol=1e-5, atol=1e-5, err_msg=ex.where)
        assert rec["tokens"] == [len(r) for r in ref]
        acc.append(np.argmax([r.sum() for r in ref]) == ex.label)
        acc_norm.append(np.argmax([r.mean() for r in ref]) == ex.label)
    assert report["metrics"]["acc"] == pytest.approx(np.mean(acc))
    assert report["metrics"]["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert split >= 8  # "... of " + "the" is " the", not " " + "the"


@pytest.mark.parametrize("stride", [None, T_CTX, 5])
def test_bits_per_byte_matches_transformers(hf_pair, pydoc_text, tmp_path, stride):
    model, tok, hf, _ = hf_pair
    docs = [pydoc_text[a:a + n] for a, n in [(0, 3), (100, 60), (5000, 400), (9000, 1000), (20000, 130)]]
    docs.append("naïve café 日本語 🙂 x")  # multi-byte characters: bytes are UTF-8 bytes, not characters
    f = tmp_path / "docs.jsonl"
    write_jsonl(f, [{"text": d} for d in docs])
    report = evaluate(model, tok, "bpb", data=str(f), stride=stride, batch_tokens=64)
    S = stride or T_CTX // 2
    nats_all = 0.0
    for d, rec in zip(docs, report["records"]):
        ids = [tok.eot_token] + tok.encode_ordinary(d).tolist()
        ref = -ref_rolling(hf, ids, S)
        assert rec["bytes"] == len(d.encode("utf-8")) and rec["tokens"] == len(ids) - 1
        np.testing.assert_allclose(rec["nats"], ref, rtol=1e-5)
        nats_all += ref
    bpb = nats_all / math.log(2) / sum(len(d.encode()) for d in docs)
    assert report["metrics"]["bpb"] == pytest.approx(bpb, rel=1e-5)


def test_window_requests_predict_every_token_once():
    for n, T, S in itertools.product([2, 3, 10, 33, 64, 65], [1, 4, 8], [1, 3, 4, 8]):
        if S > T:
            with pytest.raises(ValueError, match="stride"):
                window_requests(range(n), T, S)
            continue
        ws = window_requests(np.arange(n), T, S)
        targets = [int(t) for _, c in ws for t in c]
        assert targets == list(range(1, n))
        for ctx, cont in ws:
            assert len(ctx) + len(cont) - 1 <= T and len(cont) <= S
            assert list(ctx) + list(cont) == list(range(int(ctx[0]), int(cont[-1]) + 1))  # contiguous
            assert len(ctx) >= min(T - S + 1, int(cont[0]))  # as much context as fits


def test_lm_eval_adapter_matches_transformers(hf_pair, pydoc_text):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from fastllm.eval.harness import FastLLM

    model, tok, hf, d = hf_pair
    lm = FastLLM(model=model, tokenizer=tok, batch_tokens=80)
    pairs = [("The", " result of"), ("", "Hello world"), (pydoc_text[:300], " the"), ("x = ", "1 + 2"),
             ("Return", " value")]
    # a continuation that is the model's greedy token: is_greedy must say so
    ctx_ids = tok.encode("def f(x):")
    import torch

    with torch.no_grad():
        best = int(hf(torch.tensor([ctx_ids.tolist()])).logits[0, -1].argmax())
    pairs.append(("def f(x):", tok.decode([best])))
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    for (ctx, cont), (lp, greedy) in zip(pairs, out):
        if ctx:
            c_ids, t_ids = lm._encode_pair(ctx, cont)
        else:
            c_ids, t_ids = [tok.eot_token], lm.tok_encode(cont)
        seq = (c_ids + t_ids)[-(T_CTX + 1):]
        with torch.no_grad():
            logits = hf(torch.tensor([seq[:-1]])).logits[0, -len(t_ids):]
        assert lp == pytest.approx(ref_continuation(hf, c_ids, t_ids).sum(), rel=1e-5, abs=1e-5)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(t_ids)).all())
    assert out[-1][1] is True
    texts = [pydoc_text[:50], pydoc_text[1000:1700], "a"]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                       disable_tqdm=True)
    for t, v in zip(texts, rolling):
        assert v == pytest.approx(ref_rolling(hf, [tok.eot_token] + lm.tok_encode(t), T_CTX), rel=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,rtol", [("float32", 2e-3), ("bfloat16", 3e-2)])
def test_gpu_model_scores_like_the_cpu_model(tmp_path, dtype, rtol):
    """The same evaluation on GPT.to("cuda") (a GPU, or the CUDA emulator in CI): multiple-choice scores and bits
    per byte within the GPU tolerances of tests/test_cuda_model.py (fp32 GEMM path ~2e-3, bf16 ~2e-2)."""
    tok = byte_tokenizer()
    cpu = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=128), init=False)
    cpu.params[:] = np.random.default_rng(0).standard_normal(cpu.num_parameters).astype(np.float32) * 0.05
    gpu = GPT(cpu.config, init=False, device="cuda", dtype=dtype).load_state_dict(cpu.state_dict())
    rows = [{"context": "The value of", "choices": ["x", "the result", "None"], "answer": 1},
            {"context": "import", "choices": [" os", " sys", "ant"], "answer": 0}] * 3
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    for a, b in zip(evaluate(cpu, tok, "mc", data=path)["records"], evaluate(gpu, tok, "mc", data=path)["records"]):
        np.testing.assert_allclose(b["logprob"], a["logprob"], rtol=rtol)
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
    want, got = (evaluate(m, tok, "bpb", data=str(tmp_path / "t.txt"))["metrics"]["bpb"] for m in (cpu, gpu))
    assert got == pytest.approx(want, rel=rtol)


# ---- hand-made file with known answers --------------------------------------------------------------------------


class CostModel:
    """A context-free stand-in: token t costs cost[t] nats wherever it appears (only forward(idx, targets))."""

    def __init__(self, cost: dict[str, float], block_size: int = 64, fail_after: int | None = None):
        self.cost = np.ones(257, np.float32)
        for ch, c in cost.items():
            self.cost[ord(ch)] = c
        self.config = GPTConfig(block_size=block_size, vocab_size=257, n_layer=1, n_head=1, n_embd=4)
        self.training, self.forwards, self.fail_after = False, 0, fail_after

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def forward(self, idx, targets):
        if self.fail_after is not None and self.forwards >= self.fail_after:
            raise KeyboardInterrupt
        self.forwards += 1
        t = np.asarray(targets)
        self.token_losses = np.where(t >= 0, self.cost[np.maximum(t, 0)], 0.0).astype(np.float32)
        return 0.0


def test_known_answers_every_format(tmp_path):
    """Costs: ' ' 0.5, 'a' 1, 'b' 3, 'c' 2, others 1. Summed and mean costs worked out by hand per choice."""
    model = CostModel({" ": 0.5, "a": 1.0, "b": 3.0, "c": 2.0})
    rows = [
        # ' aaaa' 4.5 (mean 0.9), ' b' 3.5 (1.75), ' bb' 6.5, ' ab' 4.5: acc picks ' b' (wrong), acc_norm ' aaaa'
        {"ctx": "x", "endings": ["aaaa", "b", "bb", "ab"], "label": 0},
        # original-release form (no ctx): ' bbb' 9.5 (2.375), ' a' 1.5 (0.75): both pick 1 (label "1": right)
        {"activity_label": "Z", "ctx_a": "x", "ctx_b": "y", "endings": ["bbb", "a"], "label": "1"},
        # generic, letter answer: ' aaaaaa' 6.5 (0.93), ' ab' 4.5 (1.5): acc picks B (right), acc_norm A (wrong)
        {"context": "q", "choices": ["aaaaaa", "ab"], "answer": "B"},
        # context ends with a space, so no delimiter; the space is scored with the choice (lm-eval's _encode_pair):
        # ' aaaaaaaa' 8.5 (0.94), ' c' 2.5 (1.25): acc ' c' (wrong), acc_norm right
        {"context": "q ", "choices": ["aaaaaaaa", "c"], "answer": "aaaaaaaa"},
        # ARC: "Question: s\nAnswer:" + ' a' 1.5 / ' b' 3.5: both pick label "1" (right)
        {"question": {"stem": "s", "choices": [{"text": "a", "label": "1"}, {"text": "b", "label": "2"}]},
         "answerKey": "1"},
    ]
    path = write_jsonl(tmp_path / "known.jsonl", rows)
    (tmp_path / "mmlu_test.csv").write_text('"q, with a comma",aa,b,cc,A\n')  # ' aa' 2.5, ' b' 3.5, ' cc' 4.5
    report = evaluate(model, byte_tokenizer(), "mc", data=[path, str(tmp_path / "mmlu_test.csv")])
    recs = report["records"]
    assert [r["label"] for r in recs] == [0, 1, 1, 0, 0, 0]
    np.testing.assert_allclose(recs[0]["logprob"], [-4.5, -3.5, -6.5, -4.5])
    assert recs[0]["tokens"] == [5, 2, 3, 3]
    np.testing.assert_allclose(recs[3]["logprob"], [-8.5, -2.5])
    np.testing.assert_allclose(recs[5]["logprob"], [-2.5, -3.5, -4.5])
    m = report["metrics"]
    assert m["acc"] == pytest.approx(4 / 6) and m["acc_norm"] == pytest.approx(5 / 6)
    assert m["acc_stderr"] == pytest.approx(np.std([0, 1, 1, 0, 1, 1], ddof=1) / math.sqrt(6))
    assert "acc_norm" in format_report(report)
    # delimiter "": the generic and ARC choices follow the context directly; HellaSwag endings keep their space
    ex = load_multiple_choice(path, delimiter="")
    assert ex[2].choices == ("aaaaaa", "ab") and ex[0].choices[0] == " aaaa"


def test_acc_norm_chars_divides_by_the_choices_characters(tmp_path):
    """acc_norm_chars is lm-eval's acc_norm: log p over the characters of the choice as the data has it (neither
    its tokens, as llm.c's acc_norm, nor the delimiter). Costs: ' ' 0.5, 'a' 1: ' a' 1.5, ' aaaa' 4.5; per token
    0.75 < 0.9 (acc_norm picks 'a'), per character 1.5 > 1.125 (acc_norm_chars picks 'aaaa')."""
    rows = [{"context": "q", "choices": ["a", "aaaa"], "answer": 1}, {"ctx": "q", "endings": ["aaaa", "a"], "label": 0},
            {"question": "q", "choices": {"text": ["a", "aaaa"], "label": ["A", "B"]}, "answerKey": "B"}]
    rep = evaluate(CostModel({" ": 0.5, "a": 1.0}), byte_tokenizer(), "mc", data=write_jsonl(tmp_path / "x.jsonl",
                                                                                              rows))
    assert [r["chars"] for r in rep["records"]] == [[1, 4], [4, 1], [1, 4]]
    m = rep["metrics"]
    assert (m["acc"], m["acc_norm"], m["acc_norm_chars"]) == (0.0, 0.0, 1.0)


def test_hub_forms_equal_the_release_forms(tmp_path):
    """The rows the Hugging Face Hub ships (ARC and OpenBookQA with a {"text", "label"} choices dict, cais/mmlu,
    PIQA, Winogrande as lm-eval scores it), as JSONL or in the Hub's own Parquet files, give the same examples as
    AI2's ARC release and MMLU's CSV."""
    from fastllm.eval.data import parse_choice

    def same(a, b):
        return (a.context, a.choices, a.label) == (b.context, b.choices, b.label)

    arc_ai2 = {"question": {"stem": "Which is a metal?", "choices": [{"text": "iron", "label": "A"},
                                                                      {"text": "wood", "label": "B"}]},
               "answerKey": "A"}
    arc_hub = {"id": "Mercury_1", "question": "Which is a metal?",
               "choices": {"text": ["iron", "wood"], "label": ["A", "B"]}, "answerKey": "A"}
    assert same(parse_choice(arc_hub, "x"), parse_choice(arc_ai2, "x"))
    obqa = {"id": "7-980", "question_stem": "The sun is", "choices": {"text": ["hot", "cold", "wet", "blue"],
                                                                      "label": ["A", "B", "C", "D"]},
            "answerKey": "A"}
    ex = parse_choice(obqa, "x")  # the stem continued by each choice, as lm-eval's openbookqa
    assert (ex.context, ex.choices, ex.label) == ("The sun is", (" hot", " cold", " wet", " blue"), 0)
    (tmp_path / "mmlu_test.csv").write_text("What is 2+2?,3,4,5,6,B\n")
    mmlu_hub = {"question": "What is 2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}
    assert same(parse_choice(mmlu_hub, "x"), load_multiple_choice(tmp_path / "mmlu_test.csv")[0])
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbfWhat is 2+2?,3,4,5,6,B\r\n")  # a BOM, CRLF: the same
    assert same(parse_choice(mmlu_hub, "x"), load_multiple_choice(tmp_path / "excel.csv")[0])
    wino = parse_choice({"sentence": "The cup fell off the table because _ was tilted.", "option1": "the cup",
                         "option2": "the table", "answer": "2"}, "x")
    assert (wino.contexts, wino.choices, wino.label) == (("The cup fell off the table because the cup",
                                                          "The cup fell off the table because the table"),
                                                         (" was tilted.", " was tilted."), 1)
    piqa = parse_choice({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}, "x")
    assert (piqa.context, piqa.choices, piqa.label) == ("Question: Open a jar\nAnswer:",
                                                        (" twist the lid", " eat the lid"), 0)
    rows = [arc_hub, {**arc_hub, "answerKey": "B"}, {**arc_hub, "id": None}, obqa]
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [tmp_path / "arc-00000-of-00001.parquet", tmp_path / "obqa-00000-of-00001.parquet"]
    pq.write_table(pa.Table.from_pylist(rows[:3]), files[0])  # choices: a struct column; a null id
    pq.write_table(pa.Table.from_pylist(rows[3:]), files[1])
    got = load_multiple_choice(files)
    want = load_multiple_choice(write_jsonl(tmp_path / "rows.jsonl", rows))
    assert len(got) == 4 and all(same(a, b) for a, b in zip(got, want))
    assert got[2].where.endswith("arc-00000-of-00001.parquet:3")


# ---- a model trained here on a learnable task scores far above chance -------------------------------------------


def sort_examples(rng, lists):
    """Multiple-choice rows: context 'sort 3142=', the sorted digits among 3 distractors: two shuffles of the same
    digits and a sorted list with one digit changed (so a model must sort, not just write sorted digits)."""
    rows = []
    for p in lists:
        digits = p[5:-1]
        right = "".join(sorted(digits))
        wrong = {right}
        while len(wrong) < 3:
            shuffled = "".join(rng.permutation(list(digits)))
            wrong.add(shuffled if len(set(digits)) > 1 else str(rng.integers(10**3, 10**4)))
        while len(wrong) < 4:
            d = list(right)
            d[int(rng.integers(0, 4))] = str(rng.integers(0, 10))
            wrong.add("".join(sorted(d)))
        choices = sorted(wrong)
        rows.append({"context": p, "choices": choices, "answer": choices.index(right)})
    return rows


STEPS = 120  # supervised steps: good at sorting, not perfect (so agreements below are not all 1.0 == 1.0)


@pytest.fixture(scope="module")
def sorter(tmp_path_factory):
    """A tiny GPT trained (supervised) on 4-digit sorting, its checkpoint, and 100 held-out lists."""
    fastllm.set_num_threads(1)
    d = tmp_path_factory.mktemp("sorter")
    tok, task = byte_tokenizer(), SortTask(4)
    tok.save(d / "tok.tiktoken")
    rng = np.random.default_rng(0)
    prompts = ["sort " + "".join(p) + "=" for p in itertools.product("0123456789", repeat=4)]
    perm = rng.permutation(len(prompts))
    held, train = [prompts[i] for i in perm[:100]], [prompts[i] for i in perm[100:]]
    m = GPT(GPTConfig(block_size=24, vocab_size=257, n_layer=2, n_head=2, n_embd=64), seed=0)
    untrained = GPT(m.config, init=False)
    untrained.params[:] = m.params
    opt = AdamW(m, 3e-3, weight_decay=0.0)
    for _ in range(STEPS):
        batch = [train[i] for i in rng.integers(0, len(train), 32)]
        m.zero_grad()
        m.forward(*supervised_batch(tok, [(p, task.answer(p)) for p in batch]))
        m.backward()
        opt.step()
    ck = save(d / "run", STEPS, m, opt, {}, kind="sft", tokenizer=d / "tok.tiktoken")
    return m, untrained, tok, held, ck


def test_trained_model_scores_far_above_chance(sorter, tmp_path):
    m, untrained, tok, held, _ = sorter
    path = write_jsonl(tmp_path / "sort_mc.jsonl", sort_examples(np.random.default_rng(1), held))
    before = evaluate(untrained, tok, "mc", data=path, delimiter="")["metrics"]
    after = evaluate(m, tok, "mc", data=path, delimiter="")["metrics"]
    print(f"\nsort multiple choice (4 choices, 100 held-out lists): acc {before['acc']:.2f} -> {after['acc']:.2f}, "
          f"acc_norm {before['acc_norm']:.2f} -> {after['acc_norm']:.2f}")
    assert before["acc"] < 0.45
    assert after["acc"] >= 0.8 and after["acc_norm"] >= 0.8


def test_generative_exact_match_and_pass_at_k(sorter, tmp_path):
    m, untrained, tok, held, ck = sorter
    task = SortTask(4)
    rows = [{"prompt": p, "answer": task.answer(p)} if i % 2 else
            {"question": p, "answer": f"we sort the digits\n#### {task.answer(p)}"} for i, p in enumerate(held)]
    path = write_jsonl(tmp_path / "sort.jsonl", rows)
    rep = evaluate(m, tok, "gen", data=path, max_new_tokens=6, batch_size=16)
    from fastllm.rl import sample_completions
    from fastllm.tasks import same_answer

    _, _, texts = sample_completions(m, tok, held, 1, 6, temperature=0.0)  # RL's own greedy rollouts
    assert [r["completions"] for r in rep["records"]] == texts
    correct = [same_answer(t[0], task.answer(p)) for p, t in zip(held, texts)]
    assert rep["metrics"]["exact_match"] == pytest.approx(np.mean(correct))
    assert 0.3 < rep["metrics"]["exact_match"] < 1
    # the built-in task on generated prompts
    gen = evaluate(m, tok, "sort", digits=4, limit=50, max_new_tokens=6)
    assert gen["n"] == 50 and gen["metrics"]["exact_match"] > 0.25
    # pass@k from 4 samples per problem at temperature 1; pass@4 >= pass@1
    rep = evaluate(m, tok, "gen", data=path, limit=20, max_new_tokens=6, samples=4, temperature=1.0, seed=3)
    pk = rep["metrics"]
    assert set(pk) >= {"pass@1", "pass@4"} and pk["pass@4"] >= pk["pass@1"] > 0.2
    assert pk["pass@1"] == pytest.approx(np.mean([np.mean(r["correct"]) for r in rep["records"]]))
    # stop strings cut the completion (not included)
    rep = evaluate(m, tok, "gen", data=path, limit=8, max_new_tokens=6, stop=["0", "1"])
    assert all("0" not in c and "1" not in c for r in rep["records"] for c in r["completions"])


def test_chat_models_get_chatml_prompts(tmp_path, monkeypatch):
    """With <|im_start|>/<|im_end|> in the tokenizer, a problem becomes a ChatML user turn + the assistant header
    (sft.render_prompt, what `fastllm chat` feeds the model) and <|im_end|> ends completions; base models get the
    templated text."""
    import fastllm.eval as ev
    from fastllm.sft import render_prompt, with_chat_tokens

    chat_tok = with_chat_tokens(byte_tokenizer())
    seen = {}

    def fake_generate(model, tokenizer, rows, max_new_tokens, stop=(), stop_tokens=(), **kw):
        seen.update(rows=[list(r) for r in rows], stop_tokens=stop_tokens, stop=stop)
        return ["#### 4"] * len(rows)

    monkeypatch.setattr(ev, "generate_until", fake_generate)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    model = GPT(GPTConfig(block_size=64, vocab_size=chat_tok.n_vocab, n_layer=1, n_head=1, n_embd=8))
    rep = evaluate(model, chat_tok, "gen", data=path, template="Q: {prompt}\nA:")
    want = render_prompt([{"role": "user", "content": "Q: 2+2?\nA:"}], chat_tok).tolist()
    assert seen["rows"] == [want] and seen["stop_tokens"] == (chat_tok.special_tokens["<|im_end|>"], EOT)
    assert rep["metrics"]["exact_match"] == 1.0
    evaluate(model, chat_tok, "gen", data=path, chat=False, template="Q: {prompt}\nA:", stop=["\n\n"])
    assert seen["rows"] == [chat_tok.encode_ordinary("Q: 2+2?\nA:").tolist()] and seen["stop"] == ["\n\n"]


def test_pass_at_k_estimator_against_enumeration():
    for n, c, k in [(4, 1, 1), (5, 2, 3), (6, 0, 2), (6, 6, 1), (10, 3, 10), (7, 4, 5)]:
        subsets = list(itertools.combinations(range(n), k))  # the first c samples are the correct ones
        brute = np.mean([any(i < c for i in s) for s in subsets])
        assert pass_at_k(n, c, k) == pytest.approx(brute)


# ---- lm-evaluation-harness end to end on local tasks -------------------------------------------------------------


def test_lm_eval_runs_local_tasks_end_to_end(sorter, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from fastllm.eval.harness import simple_evaluate

    m, _, tok, held, _ = sorter
    task = SortTask(4)
    mc = write_jsonl(tmp_path / "mc.jsonl", sort_examples(np.random.default_rng(2), held[:40]))
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": p, "answer": task.answer(p)} for p in held[:24]])
    texts = ["sort 1234=1234", "The quick brown fox jumps over the lazy dog. " * 3, "sort 9310=0139 sort 5555=5555"]
    txt = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    common = "dataset_path: json\ntest_split: test\n"
    tasks = {
        "toy_mc": "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
                  "doc_to_target: '{{answer}}'\ntarget_delimiter: ''\nmetric_list:\n  - metric: acc\n"
                  "  - metric: acc_norm\n",
        "toy_gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
                   "target_delimiter: ''\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n"
                   "  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
        "toy_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                   "metric_list:\n  - metric: bits_per_byte\n",
    }
    files = {"toy_mc": mc, "toy_gen": gen, "toy_ppl": txt}
    for name, body in tasks.items():
        (tmp_path / f"{name}.yaml").write_text(
            f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n    test: {files[name]}\n"
            f"  cache_dir: {tmp_path / 'hf_cache'}\n{body}")
    res = simple_evaluate(m, tok, list(tasks), include_path=str(tmp_path), include_defaults=False,
                          batch_tokens=256)["results"]
    ours_mc = evaluate(m, tok, "mc", data=mc, delimiter="")["metrics"]
    ours_gen = evaluate(m, tok, "gen", data=gen, max_new_tokens=6)["metrics"]
    ours_bpb = evaluate(m, tok, "bpb", data=txt, stride=m.config.block_size)["metrics"]
    print(f"\nlm-eval: {res['toy_mc']['acc,none']:.3f} acc, {res['toy_gen']['exact_match,none']:.3f} exact match, "
          f"{res['toy_ppl']['bits_per_byte,none']:.4f} bits per byte")
    assert res["toy_mc"]["acc,none"] == pytest.approx(ours_mc["acc"]) and 0.4 < ours_mc["acc"] < 1
    assert res["toy_mc"]["acc_norm,none"] == pytest.approx(ours_mc["acc_norm_chars"])  # per character
    assert res["toy_gen"]["exact_match,none"] == pytest.approx(ours_gen["exact_match"])
    assert 0.3 < ours_gen["exact_match"] < 1
    assert res["toy_ppl"]["bits_per_byte,none"] == pytest.approx(ours_bpb["bpb"], rel=1e-6)


# ---- bits per byte of token shards; resume; TrainEval; CLI -------------------------------------------------------


def test_bpb_of_shards_leaves_out_special_tokens(sorter, tmp_path):
    """A shard holds <|endoftext|> + document tokens; eot targets (0 bytes) count neither loss nor bytes."""
    from fastllm.data import write_shard

    m, _, tok, _, _ = sorter
    docs = ["sort 3142=1234", "hello there", "sort 9999=9999" * 3]
    ids = np.concatenate([[EOT] + tok.encode_ordinary(d).tolist() for d in docs])
    (tmp_path / "data").mkdir()
    write_shard(tmp_path / "data" / "val_000000.bin", ids, 257)
    write_shard(tmp_path / "data" / "train_000000.bin", ids[:5], 257)
    rep = evaluate(m, tok, "bpb", data=str(tmp_path / "data"), stride=8)
    assert rep["n"] == 1 and rep["metrics"]["bytes"] == sum(len(d) for d in docs)
    lp = np.concatenate(score_continuations(m, window_requests(ids, m.config.block_size, 8)))
    keep = ids[1:] != EOT
    assert rep["metrics"]["bpb"] == pytest.approx(-lp[keep].sum() / math.log(2) / keep.sum(), rel=1e-9)
    assert len(load_documents(str(tmp_path / "data"), tok, limit=10)[0]) == 11  # limit: tokens per shard
    assert evaluate(m, tok, "bpb", data=str(tmp_path / "data"), split="train")["metrics"]["tokens"] == 4


def test_interrupted_evaluation_resumes(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"context": "q", "choices": ["".join(rng.choice(list("abc"), int(rng.integers(1, 6)))) for _ in range(3)],
             "answer": int(rng.integers(0, 3))} for _ in range(700)]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    tok = byte_tokenizer()
    counted = CostModel({"a": 1.0, "b": 2.0})
    full = evaluate(counted, tok, "mc", data=path, batch_tokens=64)
    out = tmp_path / "report.json"
    broken = CostModel({"a": 1.0, "b": 2.0}, fail_after=counted.forwards * 2 // 3)  # killed after 1 of 3 chunks
    with pytest.raises(KeyboardInterrupt):
        evaluate(broken, tok, "mc", data=path, batch_tokens=64, out=out)
    assert not out.exists() and (tmp_path / "report.json.partial.jsonl").exists()
    again = CostModel({"a": 1.0, "b": 2.0})
    rep = evaluate(again, tok, "mc", data=path, batch_tokens=64, out=out)
    assert rep["records"] == full["records"] and rep["metrics"] == full["metrics"]
    assert again.forwards < counted.forwards * 2 // 3  # the first 256 examples were not scored again
    assert json.loads(out.read_text())["metrics"] == full["metrics"]
    assert not (tmp_path / "report.json.partial.jsonl").exists()
    # other settings (a limit): a partial file of the full run is not reused
    with pytest.raises(KeyboardInterrupt):
        evaluate(CostModel({"a": 1.0}, fail_after=counted.forwards * 2 // 3), tok, "mc", data=path,
                 batch_tokens=64, out=out)
    assert evaluate(CostModel({"a": 1.0}), tok, "mc", data=path, batch_tokens=64, out=out, limit=10)["n"] == 10
    # a pathlib.Path as data, with a report written (the config goes into the report and its fingerprint)
    rep = evaluate(CostModel({"a": 1.0}), tok, "mc", data=Path(path), batch_tokens=64, out=out, limit=10)
    assert json.loads(out.read_text())["metrics"] == rep["metrics"]


def test_train_eval_returns_metrics_to_log(sorter, tmp_path):
    m, _, tok, held, _ = sorter
    path = write_jsonl(tmp_path / "mc.jsonl", sort_examples(np.random.default_rng(1), held[:30]))
    ev = TrainEval("mc", data=path, delimiter="", name="sort_mc")
    m.train()
    got = ev(m, tok)
    assert m.training  # the loop's mode is restored
    want = evaluate(m, tok, "mc", data=path, delimiter="")["metrics"]
    assert got == {f"sort_mc/{k}": pytest.approx(v) for k, v in want.items()}
    txt = tmp_path / "t.txt"
    txt.write_text("sort 1234=1234 " * 10)
    bpb = TrainEval("bpb", data=str(txt))(m, tok)
    assert set(bpb) >= {"bpb/bpb", "bpb/nats_per_token"} and bpb["bpb/bpb"] > 0
    assert TrainEval("addition", limit=5, max_new_tokens=4)(m, tok)["addition/exact_match"] >= 0
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "x", "choices": ["a", "b"]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field 'answer'"):
        TrainEval("mc", data=bad)  # refused before training starts


def test_cli_eval(sorter, tmp_path, capsys):
    _, _, _, held, ck = sorter
    path = write_jsonl(tmp_path / "mc.jsonl", sort_examples(np.random.default_rng(1), held[:20]))
    rc = main(["eval", "--ckpt", str(ck.parent), "--task", "mc", "--data", path, "--delimiter", "", "--out",
               str(tmp_path / "r.json"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "acc_norm" in out and "20 examples" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == 20 and len(report["records"]) == 20 and report["metrics"]["acc"] > 0.6
    rc = main(["eval", "--ckpt", str(ck), "--task", "sort", "--digits", "4", "--limit", "10", "--max-new-tokens",
               "6", "--stop", r"\n", "--template", r"{prompt}\t", "--out", str(tmp_path / "g.json"), "--no-progress"])
    assert rc == 0 and "exact_match" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "g.json").read_text())["config"]
    assert cfg["stop"] == ["\n"] and cfg["template"] == "{prompt}\t"  # a shell's \n is a newline
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"ctx": "a", "endings": ["x", "y"], "label": 0}, {"ctx": "b"}])
    rc = main(["eval", "--ckpt", str(ck), "--task", "mc", "--data", bad, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("fastllm: error:") and "bad.jsonl:2" in err and "endings" in err
    assert err.count("\n") == 1
    for argv, msg in [(["--task", "nope"], "unknown evaluation task"), (["--task", "mc"], "needs data"),
                      (["--task", "gen", "--data", path, "--samples", "3"], "temperature")]:
        assert main(["eval", "--ckpt", str(ck), *argv, "--no-progress"]) == 1
        assert msg in capsys.readouterr().err

    # the quantized decode weights (--dtype int8 / w8a8): the same examples scored through the snapshot, close to
    # float32 (this model's choices are confident: the same accuracy within an example or two); CPU only
    accs = {}
    for dtype in ("float32", "int8", "w8a8"):
        rc = main(["eval", "--ckpt", str(ck), "--task", "mc", "--data", path, "--delimiter", "", "--dtype", dtype,
                   "--out", str(tmp_path / f"{dtype}.json"), "--no-progress"])
        assert rc == 0 and "acc_norm" in capsys.readouterr().out
        report = json.loads((tmp_path / f"{dtype}.json").read_text())
        accs[dtype] = report["metrics"]["acc"]
        lp = np.array([r["logprob"] for r in report["records"]])
        if dtype == "float32":
            lp32 = lp
        else:
            assert 0 < np.abs(lp - lp32).max() < 0.05 * np.abs(lp32).max()
    assert abs(accs["int8"] - accs["float32"]) <= 0.1 and abs(accs["w8a8"] - accs["float32"]) <= 0.1
    assert main(["eval", "--ckpt", str(ck), "--task", "mc", "--data", path, "--dtype", "w8a8", "--device",
                 "cuda"]) == 1
    assert "--dtype w8a8 (int8 weight copies) is for decoding on the CPU" in capsys.readouterr().err


# ---- bad files name file:line and the field -----------------------------------------------------------------------


@pytest.mark.parametrize("line,match", [
    ('{"ctx": "a", "endings": ["x", "y"]}', "missing field 'label'"),
    ('{"ctx": "a", "endings": ["x", "y"], "label": ""}', "missing field 'label'"),
    ('{"ctx": "a", "endings": ["x", "y"], "label": 5}', "field 'label' must name one of the 2 choices"),
    ('{"ctx": "a", "endings": "xy", "label": 0}', "field 'endings' must be a list"),
    ('{"endings": ["x", "y"], "label": 0}', r"missing field 'ctx' \(or 'ctx_a'/'ctx_b'\)"),
    ('{"context": "a", "choices": ["x"], "answer": 0}', "field 'choices' must be a list of at least 2"),
    ('{"choices": ["x", "y"], "answer": 0}', "missing field 'context'"),
    ('{"context": "a", "choices": ["x", "y"], "answer": "z"}', "field 'answer' must name one of"),
    ('{"question": {"stem": "s", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "B"}', "question.choices"),
    ('{"question": {"stem": "s", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}}',
     "field 'answerKey'"),
    ('{"question": "q", "choices": {"text": ["a", "b"], "label": ["A"]}, "answerKey": "A"}', "equal lengths"),
    ('{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}',
     r"field 'answerKey' must be one of the choice labels \['A', 'B'\]"),
    ('{"question_stem": 3, "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}',
     "missing field 'question_stem'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "field 'answer' must name one of the 2 choices"),
    ('{"question": "q", "choices": ["a", "b"]}', "missing field 'answer'"),
    ('{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}', "field 'label' must name one of the 2 choices"),
    ('{"goal": "g", "sol1": "a", "label": 0}', "the choices must be at least 2 strings"),
    ('{"sentence": "a _ b", "option1": "x", "option2": "y", "answer": ""}', "Winogrande's test split"),
    ('{"sentence": "a _ b", "option1": "x", "option2": "y", "answer": 3}', "field 'answer' must be 1 or 2"),
    ('{"sentence": "a b", "option1": "x", "option2": "y", "answer": "1"}', "one '_' blank"),
    ('{"sentence": "a _ b", "option1": "x", "option2": 2, "answer": "1"}', "'option1' and 'option2' must be"),
    ('{"prompt": "x"}', "not a multiple-choice example"),
    ('[1, 2]', "expected a JSON object"),
    ('{"ctx": "a", "endings": ["x", "y"], "label": 0', "bad JSON"),
])
def test_bad_multiple_choice_lines_name_file_line_and_field(tmp_path, line, match):
    good = '{"ctx": "a", "endings": ["x", "y"], "label": 0}'
    f = tmp_path / "mc.jsonl"
    f.write_text(good + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"mc.jsonl:3: .*{match}"):
        load_multiple_choice(f)


def test_bad_inputs_for_other_tasks(tmp_path):
    tok = byte_tokenizer()
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no multiple-choice examples"):
        load_multiple_choice(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_multiple_choice(tmp_path / "nope.jsonl")
    (tmp_path / "mmlu.csv").write_text("q,a,b,C\nq,a,b\n")
    with pytest.raises(ValueError, match=r"mmlu.csv:1: field 'answer'"):
        load_multiple_choice(tmp_path / "mmlu.csv")
    (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match=r"docs.jsonl:2: .*'text'"):
        load_documents(tmp_path / "docs.jsonl", tok)
    assert len(load_documents(tmp_path / "docs.jsonl", tok, limit=1)) == 1  # the bad line is not read
    with pytest.raises(ValueError, match="no documents"):
        load_documents(tmp_path / "docs.jsonl", tok, limit=0)
    with pytest.raises(ValueError, match="needs data"):
        EvalConfig(task="bpb")
    with pytest.raises(ValueError, match="stride"):
        evaluate(CostModel({}), tok, "bpb", data=str(tmp_path / "docs.jsonl"), limit=1, stride=1000)
    (tmp_path / "p.jsonl").write_text('{"question": "2+2?", "answer": "4"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: field 'answer' has no '#### <final answer>'"):
        evaluate(CostModel({}), tok, "gen", data=str(tmp_path / "p.jsonl"))
    with pytest.raises(ValueError, match="chat prompts need a chat template"):
        (tmp_path / "q.jsonl").write_text('{"prompt": "2+2=", "answer": "4"}\n')
        m = GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=1, n_head=1, n_embd=8))
        evaluate(m, tok, "gen", data=str(tmp_path / "q.jsonl"), chat=True, max_new_tokens=2)
    with pytest.raises(ValueError, match="continuation of 40 tokens > the model's context"):
        score_continuations(CostModel({}, block_size=32), [([1], list(range(40)))])


def test_generated_answers_leave_out_special_tokens(monkeypatch):
    """Generated answers (gen tasks, the lm-eval adapter's generate_until) leave out special tokens the model wrote,
    as lm-eval's HF model decodes them (tok_decode(..., skip_special_tokens=True)); stop strings are found in that
    text."""
    import fastllm.sample
    from fastllm.eval.scoring import generate_until
    from fastllm.sft import with_chat_tokens

    tok = with_chat_tokens(byte_tokenizer())
    m = GPT(GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=8), seed=0)
    start = tok.special_tokens["<|im_start|>"]
    steps = [55, start, 56, 10, 57]  # "7", <|im_start|>, "8", "\n", "9"
    monkeypatch.setattr(fastllm.sample, "stream", lambda model, rows, *a, **kw: (np.full(len(rows), t) for t in steps))
    assert generate_until(m, tok, [[1, 2], [3]], 8) == ["78\n9", "78\n9"]
    assert generate_until(m, tok, [[1, 2]], 8, stop=["8\n"]) == ["7"]  # (across the special token)
    pytest.importorskip("lm_eval")
    from fastllm.eval.harness import FastLLM

    assert FastLLM.tok_decode(type("A", (), {"tok": tok})(), [55, start, 56]) == "78"
    assert FastLLM.tok_decode(type("A", (), {"tok": tok})(), [55, start], skip_special_tokens=False) == \
        "7<|im_start|>"
