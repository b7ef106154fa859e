"""EleutherAI lm-evaluation-harness adapter: any harness task on a fastllm model (`pip install "fastllm[eval]"`).

`FastLLM` implements the harness' LM interface on fastllm's batched scoring and generation (fastllm.eval.scoring):
    loglikelihood(context, continuation) -> (log p, is_greedy): the harness' own tokenization (TemplateLM: the
        pair encoded whole and split, trailing context spaces moved to the continuation; an empty context is the
        prefix token), requests batched by length, contexts cut on the left to the model's block_size.
    loglikelihood_rolling(text) -> log p: the prefix token + the text's tokens in disjoint windows of block_size
        predictions, each with as much context as fits (the harness' get_rolling_token_windows).
    generate_until(context, gen_kwargs) -> text: greedy (or sampled, do_sample/temperature), until the stop
        strings, the end of text, the folder's EOS ids (generation_config.json, as transformers' generate) or
        max_gen_toks.
Tokens as lm-eval's HF model (HFLM) gets them from the folder's tokenizer, so that the numbers compare: every text
is encoded as `tokenizer(text)` encodes it, after the tokenizer's BOS where it has one (Llama 3's
<|begin_of_text|>; not twice); the end of text is tokenizer_config.json's eos_token, else <|endoftext|>; the prefix
token (empty contexts, rolling windows) is the BOS, else the end of text.
Chat models: apply_chat_template renders the checkpoint folder's own chat template, else fastllm's ChatML.

>>> import lm_eval
>>> from fastllm.eval.harness import FastLLM
>>> out = lm_eval.simple_evaluate(model=FastLLM("run/"), tasks=["hellaswag"], limit=100)
>>> # or: fastllm eval --ckpt run/ --task lm-eval:hellaswag,arc_easy --limit 100
The class is registered with the harness as "fastllm" (lm_eval.api.registry) once this module is imported.
"""

from __future__ import annotations

import functools

import numpy as np

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"the lm-evaluation-harness adapter needs lm-eval: pip install 'fastllm[eval]' ({e})") from e

from tqdm.auto import tqdm

from ..chat import EOT, IM_END, IM_START, ChatTemplate, eos_token_ids, special_tokens
from . import chat_of, load
from .scoring import generate_until, score_continuations, window_requests


@register_model("fastllm")
class FastLLM(TemplateLM):
    """A fastllm model for lm_eval.simple_evaluate: FastLLM(pretrained="run/") loads a checkpoint (or HF GPT-2
    folder) like `fastllm eval --ckpt`; FastLLM(model=m, tokenizer=tok) wraps objects you already have.
    batch_tokens: tokens per scoring forward; batch_size: prompts per generation batch."""

    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, batch_tokens: int = 2048,
                 batch_size: int = 32, max_gen_toks: int = 256, device: str = "cpu", dtype: str | None = None,
                 **unused):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("FastLLM needs pretrained=<checkpoint folder> or model= and tokenizer=")
            model, tokenizer = load(pretrained, tokenizer, device=device, dtype=dtype)
        elif tokenizer is None or isinstance(tokenizer, str):
            raise ValueError("FastLLM(model=...) needs the model's Tokenizer object as tokenizer=")
        folder = getattr(model, "checkpoint_dir", None)
        # the end of text as lm-eval's HF models have it: the checkpoint's eos_token (Llama 3's <|eot_id|> or
        # <|end_of_text|>, Qwen2.5-Instruct's <|im_end|>), else <|endoftext|>
        eos = special_tokens(folder).get("eos_token")
        self.eot = tokenizer.special_tokens.get(eos) if eos is not None else None
        self.eot = tokenizer.eot_token if self.eot is None else self.eot
        if self.eot is None:
            raise ValueError("the tokenizer has no <|endoftext|> token and the checkpoint names no eos_token "
                             "(the harness' prefix and end of text)")
        # generations also end at the ids transformers' generate stops at (generation_config.json's eos_token_id)
        self.stop_tokens = tuple(dict.fromkeys([*eos_token_ids(folder, tokenizer), self.eot]))
        self.model, self.tok = model.eval(), tokenizer
        self.batch_tokens, self.max_gen_toks = int(batch_tokens), int(max_gen_toks)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32  # the harness may pass "auto"

    # ---- what TemplateLM asks for ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.eot

    @property
    def prefix_token_id(self) -> int:
        # an empty context, the first token of rolling windows: the BOS where there is one (as lm-eval's HFLM)
        return self.tok.bos_token if self.tok.bos_token is not None else self.eot

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def tokenizer_name(self) -> str:
        return f"fastllm-{self.tok.n_vocab}-chatml"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # as HFLM's tokenizer(string): special-token text (a chat template's <|im_start|>) becomes its id, and the
        # BOS goes first (add_special_tokens None: unless the text starts with it; False: never)
        ids = self.tok.encode(string, allowed_special="all").tolist()
        bos = self.tok.bos_token
        if bos is not None and add_special_tokens is not False and not (add_special_tokens is None and
                                                                        ids[:1] == [bos]):
            ids = [bos] + ids
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tok.decode(tokens, skip_special_tokens=skip_special_tokens)  # (HFLM's default: skipped)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        with tqdm(total=len(requests), desc="fastllm loglikelihood", disable=disable_tqdm) as bar:
            logps, greedy = score_continuations(self.model, [(c, t) for _, c, t in requests],
                                                batch_tokens=self.batch_tokens, greedy=True, progress=bar)
        out = []
        for (key, _, _), lp, g in zip(requests, logps, greedy):
            res = (float(lp.sum()), bool(g))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        reqs, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            w = window_requests([self.prefix_token_id] + self.tok_encode(text), self.max_length)
            reqs += w
            owner += [i] * len(w)
        with tqdm(total=len(reqs), desc="fastllm loglikelihood_rolling", disable=disable_tqdm) as bar:
            logps = score_continuations(self.model, reqs, batch_tokens=self.batch_tokens, progress=bar)
        out = np.zeros(len(requests))
        for i, lp in zip(owner, logps):
            out[i] += lp.sum()
        for r, v in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), float(v))
        return [float(v) for v in out]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        with tqdm(total=len(requests), desc="fastllm generate_until", disable=disable_tqdm) as bar:
            for idxs in by_kwargs.values():
                kw = normalize_gen_kwargs(requests[idxs[0]].args[1], self.max_gen_toks)
                until = handle_stop_sequences(kw.pop("until", None), eos=None)
                n = min(int(kw.pop("max_gen_toks")), self.max_length - 1)
                temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
                prompts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in idxs]
                texts = generate_until(self.model, self.tok, prompts, n, stop=until, stop_tokens=self.stop_tokens,
                                       temperature=temperature, seed=kw.get("seed"), batch_size=self.batch_size,
                                       progress=bar)
                for i, t in zip(idxs, texts):
                    out[i] = t
                    self.cache_hook.add_partial("generate_until", requests[i].args, t)
        return out

    @functools.cached_property
    def chat(self):
        """The checkpoint's chat format (eval.chat_of), read when a task first asks for chat prompts."""
        return chat_of(self.model, self.tok)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The checkpoint folder's chat template, else fastllm's ChatML (fastllm.chat), as text; tok_encode turns
        its special tokens back into ids."""
        if isinstance(self.chat, ChatTemplate):
            return self.chat.text(chat_history, add_generation_prompt=add_generation_prompt)
        text = EOT + "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in chat_history)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def chat_template(self, chat_template: bool | str = False) -> str:
        return self.chat.template if isinstance(self.chat, ChatTemplate) else "chatml"


def simple_evaluate(model, tokenizer, tasks: list[str], limit: int | float | None = None,
                    include_path: str | None = None, include_defaults: bool = True, num_fewshot: int | None = None,
                    batch_tokens: int = 2048, apply_chat_template: bool = False, **kwargs) -> dict:
    """lm_eval.simple_evaluate on a fastllm model. include_path: a folder of your own task YAML files;
    include_defaults=False skips indexing the harness' own ~10k task files (about half a minute)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = FastLLM(model=model, tokenizer=tokenizer, batch_tokens=batch_tokens)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                   task_manager=TaskManager(include_path=include_path,
                                                            include_defaults=include_defaults),
                                   apply_chat_template=apply_chat_template, **kwargs)
