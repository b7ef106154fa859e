"""Test data: the chat templates of Hugging Face checkpoints (the `chat_template` of their tokenizer_config.json, or
chat_template.jinja) that fastllm.chat must render exactly as transformers' apply_chat_template does, and FAMILIES,
how each checkpoint family's folder names its special tokens. Nothing is downloaded: the texts are copied here,
each with where it was taken from:

- [e2e]: huggingface/huggingface.js, packages/jinja/test/e2e.test.js (ee92cdbe6, 2026-05-08): templates of hub
  checkpoints, by repo id, with the text transformers renders for them.
- [ollama]: huggingface/huggingface.js, packages/ollama-utils/src/chat-template-automap.ts (007948d5a,
  2025-12-15): the tokenizer.chat_template of the GGUF files of ollama's library, which llama.cpp's converter copies
  from the checkpoint's tokenizer_config.json.
- [llama.cpp]: ggml-org/llama.cpp, tests/test-chat-template.cpp: templates by checkpoint, as C strings.
- [olmo2]: mauer4/Attention-From-Scratch, weights/allenai/OLMo-2-1124-13B-Instruct/tokenizer_config.json
  (7b2eb9540), a copy of that checkpoint's file; open-instruct's "tulu" template is the same text without the
  leading {{ bos_token }}.

hf_families holds Llama 3's, Llama 3.1's, Qwen2.5's and Qwen3's templates (the texts [e2e] has for
meta-llama/Llama-3.1-8B-Instruct, Qwen/Qwen2.5-7B-Instruct and Qwen/Qwen3-0.6B)."""

from __future__ import annotations

from typing import NamedTuple

from hf_families import LLAMA3_TEMPLATE, LLAMA31_TEMPLATE, QWEN3_TEMPLATE, QWEN25_TEMPLATE

# meta-llama/Llama-2-7b-chat-hf: [INST] turns, the system message in <<SYS>> inside the first one, a BOS before
# every user turn; raises unless user and assistant alternate. From the llama2:7b GGUF's tokenizer.chat_template
# (copied from the checkpoint's tokenizer_config.json at conversion), as [ollama] records it.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif "
    "%}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
    "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


# mistralai/Mistral-7B-Instruct-v0.1 as first released (Sep 2023): no system role. From [e2e]
# ("TheBloke/Mistral-7B-Instruct-v0.1-GPTQ", a copy of it); the mistral:7b-instruct GGUF in [ollama]
# has the same text.
MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}"
)


# mistralai/Mistral-7B-Instruct-v0.2 and Mixtral-8x7B-Instruct-v0.1 as first released (Dec 2023): the same, no
# space before a user turn after an EOS. From [e2e] ("mistralai/Mixtral-8x7B-Instruct-v0.1");
# [llama.cpp] has it as Mistral-7B-Instruct-v0.2's "old pre-v1" template.
MISTRAL_V02_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are "
    "supported!') }}{% endif %}{% endfor %}"
)


# mistralai's "v1" template, Mistral-7B-Instruct-v0.2's current one: an optional system message in the first
# user turn. From [llama.cpp] ("mistralai/Mistral-7B-Instruct-v0.2 (mistralai 'v1' template with a
# system prompt)").
MISTRAL_V1_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)


# mistralai's "v3" template, of the tokenizer-v3 instruct models (Mistral-7B-Instruct-v0.3's tool syntax): tools
# listed in [AVAILABLE_TOOLS] before the last user turn, calls as [TOOL_CALLS] [...] with 9-character ids, results
# as [TOOL_RESULTS], the system message in the last user turn. From [llama.cpp], where it is
# "Mistral-Large-Instruct-2407 (mistralai 'v3' template)".
MISTRAL_V3_TEMPLATE = (
    "{%- if messages[0][\"role\"] == \"system\" %}\n"
    "    {%- set system_message = messages[0][\"content\"] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "{%- set user_messages = loop_messages | selectattr(\"role\", \"equalto\", \"user\") | list %}\n"
    "\n"
    "{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n"
    "{%- set ns = namespace() %}\n"
    "{%- set ns.index = 0 %}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if not (message.role == \"tool\" or message.role == \"tool_results\" or (message.tool_calls is defined "
    "and message.tool_calls is not none)) %}\n"
    "        {%- if (message[\"role\"] == \"user\") != (ns.index % 2 == 0) %}\n"
    "            {{- raise_exception(\"After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n"
    "        {%- endif %}\n"
    "        {%- set ns.index = ns.index + 1 %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message[\"role\"] == \"user\" %}\n"
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    "            {{- \"[AVAILABLE_TOOLS] [\" }}\n"
    "            {%- for tool in tools %}\n"
    "                {%- set tool = tool.function %}\n"
    "                {{- '{\"type\": \"function\", \"function\": {' }}\n"
    "                {%- for key, val in tool.items() if key != \"return\" %}\n"
    "                    {%- if val is string %}\n"
    "                        {{- '\"' + key + '\": \"' + val + '\"' }}\n"
    "                    {%- else %}\n"
    "                        {{- '\"' + key + '\": ' + val|tojson }}\n"
    "                    {%- endif %}\n"
    "                    {%- if not loop.last %}\n"
    "                        {{- \", \" }}\n"
    "                    {%- endif %}\n"
    "                {%- endfor %}\n"
    "                {{- \"}}\" }}\n"
    "                {%- if not loop.last %}\n"
    "                    {{- \", \" }}\n"
    "                {%- else %}\n"
    "                    {{- \"]\" }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "            {{- \"[/AVAILABLE_TOOLS]\" }}\n"
    "            {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- else %}\n"
    "            {{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- endif %}\n"
    "    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n"
    "        {{- \"[TOOL_CALLS] [\" }}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- set out = tool_call.function|tojson %}\n"
    "            {{- out[:-1] }}\n"
    "            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n"
    "                {{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}\n"
    "            {%- endif %}\n"
    "            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n"
    "            {%- if not loop.last %}\n"
    "                {{- \", \" }}\n"
    "            {%- else %}\n"
    "                {{- \"]\" + eos_token }}\n"
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    "    {%- elif message[\"role\"] == \"assistant\" %}\n"
    "        {{- \" \" + message[\"content\"]|trim + eos_token}}\n"
    "    {%- elif message[\"role\"] == \"tool_results\" or message[\"role\"] == \"tool\" %}\n"
    "        {%- if message.content is defined and message.content.content is defined %}\n"
    "            {%- set content = message.content.content %}\n"
    "        {%- else %}\n"
    "            {%- set content = message.content %}\n"
    "        {%- endif %}\n"
    "        {{- '[TOOL_RESULTS] {\"content\": ' + content|string + \", \" }}\n"
    "        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n"
    "            {{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }}\n"
    "        {%- endif %}\n"
    "        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Only user and assistant roles are supported, with the exception of an initial "
    "optional system message!\") }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)


# mistralai/Mistral-7B-Instruct-v0.3's template as first released (May 2024), with tools and no system role.
# From [e2e] ("mistralai/Mistral-7B-Instruct-v0.3 (JSON Schema)").
MISTRAL_V03_TEMPLATE_2024_05 = (
    "{{- bos_token }}\n"
    "{%- set user_messages = messages | selectattr('role', 'equalto', 'user') | list %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if tools and (message == user_messages[-1]) %}\n"
    "            {{- ' [AVAILABLE_TOOLS] [' }}\n"
    "            {%- for tool in tools %}\n"
    "\t\t{%- set tool = tool.function %}\n"
    "\t\t{{- '{\"type\": \"function\", \"function\": {' }}\n"
    "\t\t{%- for key, val in tool|items if key != \"return\" %}\n"
    "\t\t    {%- if val is string %}\n"
    "\t\t\t{{- '\"' + key + '\": \"' + val + '\"' }}\n"
    "\t\t    {%- else %}\n"
    "\t\t\t{{- '\"' + key + '\": ' + val|tojson }}\n"
    "\t\t    {%- endif %}\n"
    "\t\t    {%- if not loop.last %}\n"
    "\t\t\t{{- \", \" }}\n"
    "\t\t    {%- endif %}\n"
    "\t\t{%- endfor %}\n"
    "\t\t{{- \"}}\" }}\n"
    "                {%- if not loop.last %}\n"
    "                    {{- \", \" }}\n"
    "                {%- else %}\n"
    "                    {{- \"]\" }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "            {{- ' [/AVAILABLE_TOOLS]' }}\n"
    "            {%- endif %}\n"
    "        {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {%- if message.tool_calls is defined and message.tool_calls|length > 0 %}\n"
    "            {{- ' [TOOL_CALLS] [' }}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {{- {\"name\": tool_call.function.name, \"arguments\": tool_call.function.arguments, \"id\": "
    "tool_call.id}|tojson }}\n"
    "                {%- if not loop.last %}\n"
    "                    {{- \", \" }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "            {{- '] ' }}\n"
    "            {{- eos_token }}\n"
    "    \t{%- elif message.content is defined %}\n"
    "\t    {{- ' ' + message.content + ' ' + eos_token}}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'tool' %}\n"
    "        {{- ' [TOOL_RESULTS] ' }}\n"
    "        {{- '{\"call_id\": \"' + message.tool_call_id + '\", \"content\": ' + message.content|string + '}' }}\n"
    "        {{- ' [/TOOL_RESULTS] ' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)


# HuggingFaceH4/zephyr-7b-beta's, which TinyLlama/TinyLlama-1.1B-Chat-v1.0 ships too: <|user|>, <|system|> and
# <|assistant|> turns each ended by the EOS. Note the newlines inside its string literals. From
# [e2e] ("HuggingFaceH4/zephyr-7b-beta"); the tinyllama:1.1b GGUF in [ollama] has the same text.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n"
    "' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n"
    "' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n"
    "'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)


# microsoft/Phi-3-mini-4k-instruct's (its 2024 update, with the system role): <|user|> ... <|end|> turns; the EOS
# ends a conversation without a generation prompt. From the phi3:3.8b GGUF in [ollama].
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n"
    "' + message['content'] + '<|end|>\n"
    "'}}{% elif message['role'] == 'user' %}{{'<|user|>\n"
    "' + message['content'] + '<|end|>\n"
    "'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n"
    "' + message['content'] + '<|end|>\n"
    "'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n"
    "' }}{% else %}{{ eos_token }}{% endif %}"
)


# allenai/OLMo-2-1124-13B-Instruct's (Tülu 3's template after the BOS; public code quotes the same text for
# OLMo-2-1124-7B-SFT and uses it for OLMo-2-0425-1B): <|system|>, <|user|>, <|assistant|> turns (plain text to its
# tokenizer, no tokens of their own), each assistant turn ended by the EOS (<|endoftext|>, also the BOS) and, but
# for the last message, a newline. From [olmo2] (the double space after '<|assistant|>\n' is the template's
# source, not its output).
OLMO2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n"
    "' + message['content'] + '\n"
    "' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n"
    "' + message['content'] + '\n"
    "' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\n"
    "'  + message['content'] + eos_token + '\n"
    "' }}{% else %}{{ '<|assistant|>\n"
    "'  + message['content'] + eos_token }}{% endif %}{% endif %}{% if loop.last and add_generation_prompt %}"
    "{{ '<|assistant|>\n"
    "' }}{% endif %}{% endfor %}"
)


# google/gemma-2-2b-it's: <start_of_turn>user / model turns; raises on a system message and on roles that do not
# alternate. From the gemma2:2b GGUF in [ollama] (gemma-7b-it's in [llama.cpp]
# is the same without the leading bos_token).
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif "
    "%}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ "
    "raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
    "(message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif "
    "%}{{ '<start_of_turn>' + role + '\n"
    "' + message['content'] | trim + '<end_of_turn>\n"
    "' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n"
    "'}}{% endif %}"
)


# google/gemma-3-1b-it's (and 4b/12b/27b-it's): Gemma 2's turns; a system message becomes the first user turn's
# prefix; image parts render <start_of_image>. From google/gemma-3-4b-it's tokenizer_config.json as quoted in public
# repositories (the same text in several).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


# HuggingFaceTB/SmolLM2-135M-Instruct's (and 360M, 1.7B): ChatML with a default system message. From the
# smollm2:135m GGUF in [ollama].
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}"
)


# HuggingFaceTB/SmolLM3-3B's: /think and /no_think modes (enable_thinking), today's date (strftime_now), tools
# (xml_tools / python_tools / tools), {% generation %} blocks. From [e2e]
# ("HuggingFaceTB/SmolLM3-3B").
SMOLLM3_TEMPLATE = (
    "{# ───── defaults ───── #}\n"
    "{%- if enable_thinking is not defined -%}\n"
    "{%- set enable_thinking = true -%}\n"
    "{%- endif -%}\n"
    "\n"
    "{# ───── reasoning mode ───── #}\n"
    "{%- if enable_thinking -%}\n"
    "  {%- set reasoning_mode = \"/think\" -%}\n"
    "{%- else -%}\n"
    "  {%- set reasoning_mode = \"/no_think\" -%}\n"
    "{%- endif -%}\n"
    "\n"
    "{# ───── header (system message) ───── #}\n"
    "{{- \"<|im_start|>system\\n\" -}}\n"
    "\n"
    "{%- if messages[0].role == \"system\" -%}\n"
    "  {%- set system_message = messages[0].content -%}\n"
    "  {%- if \"/no_think\" in system_message -%}\n"
    "    {%- set reasoning_mode = \"/no_think\" -%}\n"
    "  {%- elif \"/think\" in system_message -%}\n"
    "    {%- set reasoning_mode = \"/think\" -%}\n"
    "  {%- endif -%}\n"
    "  {%- set custom_instructions = system_message.replace(\"/no_think\", \"\").replace(\"/think\", \"\").rstrip() "
    "-%}\n"
    "{%- endif -%}\n"
    "\n"
    "{%- if \"/system_override\" in system_message -%}\n"
    "  {{- custom_instructions.replace(\"/system_override\", \"\").rstrip() -}}\n"
    "  {{- \"<|im_end|>\\n\" -}}\n"
    "{%- else -%}\n"
    "  {{- \"## Metadata\\n\\n\" -}}\n"
    "  {{- \"Knowledge Cutoff Date: June 2025\\n\" -}}\n"
    "  {%- set today = strftime_now(\"%d %B %Y\") -%}\n"
    "  {{- \"Today Date: \" ~ today ~ \"\\n\" -}}\n"
    "  {{- \"Reasoning Mode: \" + reasoning_mode + \"\\n\\n\" -}}\n"
    "  \n"
    "  {{- \"## Custom Instructions\\n\\n\" -}}\n"
    "  {%- if custom_instructions -%}\n"
    "    {{- custom_instructions + \"\\n\\n\" -}}\n"
    "  {%- elif reasoning_mode == \"/think\" -%}\n"
    "    {{- \"You are a helpful AI assistant named SmolLM, trained by Hugging Face. Your role as an assistant "
    "involves thoroughly exploring questions through a systematic thinking process before providing the final precise "
    "and accurate solutions. This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, "
    "reassessment, reflection, backtracking, and iteration to develop well-considered thinking process. Please "
    "structure your response into two main sections: Thought and Solution using the specified format: <think> Thought "
    "section </think> Solution section. In the Thought section, detail your reasoning process in steps. Each step "
    "should include detailed considerations such as analysing questions, summarizing relevant findings, brainstorming "
    "new ideas, verifying the accuracy of the current steps, refining any errors, and revisiting previous steps. In "
    "the Solution section, based on various attempts, explorations, and reflections from the Thought section, "
    "systematically present the final solution that you deem correct. The Solution section should be logical, "
    "accurate, and concise and detail necessary steps needed to reach the conclusion.\\n\\n\" -}}\n"
    "  {%- else -%}\n"
    "    {{- \"You are a helpful AI assistant named SmolLM, trained by Hugging Face.\\n\\n\" -}}\n"
    "  {%- endif -%}\n"
    "\n"
    "  {%- if xml_tools or python_tools or tools -%}\n"
    "    {{- \"### Tools\\n\\n\" -}}\n"
    "    {%- if xml_tools or tools -%}\n"
    "      {%- if tools -%}\n"
    "        {%- set xml_tools = tools -%}\n"
    "      {%- endif -%}\n"
    "      {%- set ns = namespace(xml_tool_string=\"You may call one or more functions to assist with the user "
    "query.\\nYou are provided with function signatures within <tools></tools> XML tags:\\n\\n<tools>\\n\") -%}\n"
    "      {%- for tool in xml_tools[:] -%} {# The slicing makes sure that xml_tools is a list #}\n"
    "        {%- set ns.xml_tool_string = ns.xml_tool_string ~ (tool | string) ~ \"\\n\" -%}\n"
    "      {%- endfor -%}\n"
    "      {%- set xml_tool_string = ns.xml_tool_string + \"</tools>\\n\\nFor each function call, return a json object "
    "with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": "
    "<function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call>\" -%}\n"
    "      {{- xml_tool_string -}}\n"
    "    {%- endif -%}\n"
    "    {%- if python_tools -%}\n"
    "      {%- set ns = namespace(python_tool_string=\"When you send a message containing Python code between '<code>' "
    "and '</code>' tags, it will be executed in a stateful Jupyter notebook environment, and you will then be given "
    "the output to continued reasoning in an agentic loop.\\n\\nYou can use the following tools in your python code "
    "like regular functions:\\n<tools>\\n\") -%}\n"
    "      {%- for tool in python_tools[:] -%} {# The slicing makes sure that python_tools is a list #}\n"
    "        {%- set ns.python_tool_string = ns.python_tool_string ~ (tool | string) ~ \"\\n\" -%}\n"
    "      {%- endfor -%}\n"
    "      {%- set python_tool_string = ns.python_tool_string + \"</tools>\\n\\nThe state persists between code "
    "executions: so variables that you define in one step are still available thereafter.\" -%}\n"
    "      {{- python_tool_string -}}\n"
    "    {%- endif -%}\n"
    "    {{- \"\\n\\n\" -}}\n"
    "    {{- \"<|im_end|>\\n\" -}}\n"
    "  {%- endif -%}\n"
    "{%- endif -%}\n"
    "{# ───── main loop ───── #}\n"
    "{%- for message in messages -%}\n"
    "    {%- set content = message.content if message.content is string else \"\" -%}\n"
    "    {%- if message.role == \"user\" -%}\n"
    "        {{ \"<|im_start|>\" + message.role + \"\\n\"  + content + \"<|im_end|>\\n\" }}\n"
    "    {%- elif message.role == \"assistant\" -%}\n"
    "        {% generation %}\n"
    "        {%- if reasoning_mode == \"/think\" -%}\n"
    "            {{ \"<|im_start|>assistant\\n\" + content.lstrip(\"\\n\") + \"<|im_end|>\\n\" }}\n"
    "        {%- else -%}\n"
    "            {{ \"<|im_start|>assistant\\n\" + \"<think>\\n\\n</think>\\n\" + content.lstrip(\"\\n\") + "
    "\"<|im_end|>\\n\" }}\n"
    "        {%- endif -%}\n"
    "        {% endgeneration %}\n"
    "    {%- elif message.role == \"tool\" -%}\n"
    "    {{ \"<|im_start|>\" + \"user\\n\"  + content + \"<|im_end|>\\n\" }}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{# ───── generation prompt ───── #}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {%- if reasoning_mode == \"/think\" -%}\n"
    "        {{ \"<|im_start|>assistant\\n\" }}\n"
    "    {%- else -%}\n"
    "        {{ \"<|im_start|>assistant\\n\" + \"<think>\\n\\n</think>\\n\"  }}\n"
    "    {%- endif -%}\n"
    "{%- endif -%}"
)


# meta-llama/Llama-3.2-1B-Instruct's and 3B's: Llama 3.1's with today's date from strftime_now (date_string
# overrides it) and no builtin tools. From the llama3.2:3b GGUF in [ollama].
LLAMA32_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n"
    "    {%- set tools = custom_tools %}\n"
    "{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n"
    "    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- System message #}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{%- if tools is not none %}\n"
    "    {{- \"Environment: ipython\\n\" }}\n"
    "{%- endif %}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{%- if tools is not none and not tools_in_user_message %}\n"
    "    {{- \"You have access to the following functions. To call a function, please respond with JSON for a function "
    "call.\" }}\n"
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its "
    "value}.' }}\n"
    "    {{- \"Do not use variables.\\n\\n\" }}\n"
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n"
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") "
    "}}\n"
    "{%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    "    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n"
    "    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n"
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its "
    "value}.' }}\n"
    "    {{- \"Do not use variables.\\n\\n\" }}\n"
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n"
    "    {%- endfor %}\n"
    "    {{- first_user_message + \"<|eot_id|>\"}}\n"
    "{%- endif %}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
    "'<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    "            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n"
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "        {{- '\"parameters\": ' }}\n"
    "        {{- tool_call.arguments | tojson }}\n"
    "        {{- \"}\" }}\n"
    "        {{- \"<|eot_id|>\" }}\n"
    "    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
    "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    "        {{- \"<|eot_id|>\" }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)


# NousResearch's Hermes 2 models list two named templates in tokenizer_config.json: "default", plain ChatML (this,
# from the nous-hermes2-mixtral:8x7b GGUF in [ollama]), and "tool_use":
HERMES_DEFAULT_TEMPLATE = (
    "{{bos_token}}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}"
)


# NousResearch/Hermes-2-Pro-Llama-3-8B's "tool_use" template, which transformers renders whenever tools are
# given: tools described in the system text, <tool_call> calls, results in a "tool" turn that must name the
# function. From [e2e] ("NousResearch/Hermes-2-Pro-Llama-3-8B (JSON Schema)").
HERMES2_PRO_TOOL_USE_TEMPLATE = (
    "{%- macro json_to_python_type(json_spec) %}\n"
    "{%- set basic_type_map = {\n"
    "    \"string\": \"str\",\n"
    "    \"number\": \"float\",\n"
    "    \"integer\": \"int\",\n"
    "    \"boolean\": \"bool\"\n"
    "} %}\n"
    "\n"
    "{%- if basic_type_map[json_spec.type] is defined %}\n"
    "    {{- basic_type_map[json_spec.type] }}\n"
    "{%- elif json_spec.type == \"array\" %}\n"
    "    {{- \"list[\" +  json_to_python_type(json_spec|items) + \"]\"}}\n"
    "{%- elif json_spec.type == \"object\" %}\n"
    "    {%- if json_spec.additionalProperties is defined %}\n"
    "        {{- \"dict[str, \" + json_to_python_type(json_spec.additionalProperties) + ']'}}\n"
    "    {%- else %}\n"
    "        {{- \"dict\" }}\n"
    "    {%- endif %}\n"
    "{%- elif json_spec.type is iterable %}\n"
    "    {{- \"Union[\" }}\n"
    "    {%- for t in json_spec.type %}\n"
    "      {{- json_to_python_type({\"type\": t}) }}\n"
    "      {%- if not loop.last %}\n"
    "        {{- \",\" }} \n"
    "    {%- endif %}\n"
    "    {%- endfor %}\n"
    "    {{- \"]\" }}\n"
    "{%- else %}\n"
    "    {{- \"Any\" }}\n"
    "{%- endif %}\n"
    "{%- endmacro %}\n"
    "\n"
    "\n"
    "{{- bos_token }}\n"
    "{{- \"You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what values "
    "to plug into functions. Here are the available tools: <tools> \" }}\n"
    "{%- for tool in tools %}\n"
    "    {%- if tool.function is defined %}\n"
    "        {%- set tool = tool.function %}\n"
    "    {%- endif %}\n"
    "    {{- '{\"type\": \"function\", \"function\": ' }}\n"
    "    {{- '{\"name\": ' + tool.name + '\", ' }}\n"
    "    {{- '\"description\": \"' + tool.name + '(' }}\n"
    "    {%- for param_name, param_fields in tool.parameters.properties|items %}\n"
    "        {{- param_name + \": \" + json_to_python_type(param_fields) }}\n"
    "        {%- if not loop.last %}\n"
    "            {{- \", \" }}\n"
    "        {%- endif %}\n"
    "    {%- endfor %}\n"
    "    {{- \")\" }}\n"
    "    {%- if tool.return is defined %}\n"
    "        {{- \" -> \" + json_to_python_type(tool.return) }}\n"
    "    {%- endif %}\n"
    "    {{- \" - \" + tool.description + \"\\n\\n\" }}\n"
    "    {%- for param_name, param_fields in tool.parameters.properties|items %}\n"
    "        {%- if loop.first %}\n"
    "            {{- \"    Args:\\n\" }}\n"
    "        {%- endif %}\n"
    "        {{- \"        \" + param_name + \"(\" + json_to_python_type(param_fields) + \"): \" + "
    "param_fields.description|trim }}\n"
    "    {%- endfor %}\n"
    "    {%- if tool.return is defined and tool.return.description is defined %}\n"
    "        {{- \"\\n    Returns:\\n        \" + tool.return.description }}\n"
    "    {%- endif %}\n"
    "    {{- '\"' }}\n"
    "    {{- ', \"parameters\": ' }}\n"
    "    {%- if tool.parameters.properties | length == 0 %}\n"
    "        {{- \"{}\" }}\n"
    "    {%- else %}\n"
    "        {{- tool.parameters | tojson}}\n"
    "    {%- endif %}\n"
    "    {{- \"}\" }}\n"
    "    {%- if not loop.last %}\n"
    "        {{- \"\\n\" }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{{- \" </tools>\" }}\n"
    "{{- 'Use the following pydantic model json schema for each tool call you will make: {\"properties\": "
    "{\"arguments\": {\"title\": \"Arguments\", \"type\": \"object\"}, \"name\": {\"title\": \"Name\", \"type\": "
    "\"string\"}}, \"required\": [\"arguments\", \"name\"], \"title\": \"FunctionCall\", \"type\": \"object\"}\n"
    "' }}\n"
    "{{- \"For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags as follows:\n"
    "\" }}\n"
    "{{- \"<tool_call>\n"
    "\" }}\n"
    "{{- '{\"arguments\": <args-dict>, \"name\": <function-name>}\n"
    "' }}\n"
    "{{- '</tool_call><|im_end|>' }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == \"user\" or message.role == \"system\" or (message.role == \"assistant\" and "
    "message.tool_calls is not defined) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n<tool_call>\\n' }}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '{ ' }}\n"
    "            {%- if tool_call.arguments is defined %}\n"
    "                {{- '\"arguments\": ' }}\n"
    "                {{- tool_call.arguments|tojson }}\n"
    "                {{- ', '}}\n"
    "            {%- endif %}\n"
    "            {{- '\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\"}' }}\n"
    "            {{- '\\n</tool_call> ' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if not message.name is defined %}\n"
    "            {{- raise_exception(\"Tool response dicts require a 'name' key indicating the name of the called "
    "function!\") }}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n<tool_response>\\n' }}\n"
    "        {{- '{\"name\": \"' }}\n"
    "        {{- message.name }}\n"
    "        {{- '\", \"content\": ' }}\n"
    "        {{- message.content|tojson + '}' }}\n"
    "        {{- '\\n</tool_response> <|im_end|>\\n' }} \n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


class Family(NamedTuple):
    """A checkpoint family's chat template and how its folder names special tokens: bos/eos/unk/pad as
    tokenizer_config.json sets them (None: unset), the special tokens of its vocabulary (`specials`; those not
    special but added, as Qwen's <tool_call>: `plain`), whether its tokenizer puts the BOS before every text
    (`adds_bos`, HF's TemplateProcessing), the end-of-turn tokens generation_config.json lists (`stops`), and
    template options (`options`) worth rendering with."""

    template: str
    bos: str | None
    eos: str
    unk: str | None = None
    pad: str | None = None
    specials: tuple[str, ...] = ()
    plain: tuple[str, ...] = ()
    adds_bos: bool = False
    stops: tuple[str, ...] = ()
    tools: bool = False  # the template takes OpenAI tools and writes tool calls
    options: tuple[dict, ...] = ({},)
    tool_template: str | None = None


SP = ("<unk>", "<s>", "</s>")  # the SentencePiece vocabularies' first three (Llama 2, Mistral, TinyLlama)
CHATML = ("<|im_start|>", "<|im_end|>")
LLAMA3 = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
          "<|eot_id|>", "<|python_tag|>")
MISTRAL_V3_CONTROL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                      "[/TOOL_RESULTS]")
DATE = {"date_string": "26 Jul 2024"}

FAMILIES = {
    "llama2-chat": Family(LLAMA2_CHAT_TEMPLATE, "<s>", "</s>", "<unk>", specials=SP, adds_bos=True),
    "mistral-v0.1": Family(MISTRAL_V01_TEMPLATE, "<s>", "</s>", "<unk>", specials=SP, adds_bos=True),
    "mistral-v0.2": Family(MISTRAL_V02_TEMPLATE, "<s>", "</s>", "<unk>", specials=SP, adds_bos=True),
    "mistral-v1": Family(MISTRAL_V1_TEMPLATE, "<s>", "</s>", "<unk>", specials=SP, adds_bos=True),
    "mistral-v3": Family(MISTRAL_V3_TEMPLATE, "<s>", "</s>", "<unk>", specials=SP + MISTRAL_V3_CONTROL, adds_bos=True,
                         tools=True),
    "mistral-v0.3-2024-05": Family(MISTRAL_V03_TEMPLATE_2024_05, "<s>", "</s>", "<unk>",
                                   specials=SP + MISTRAL_V3_CONTROL, adds_bos=True, tools=True),
    "zephyr": Family(ZEPHYR_TEMPLATE, "<s>", "</s>", "<unk>", "</s>", specials=SP, adds_bos=True),
    "phi-3": Family(PHI3_TEMPLATE, "<s>", "<|endoftext|>", "<unk>", "<|endoftext|>",
                    specials=SP + ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"),
                    stops=("<|endoftext|>", "<|assistant|>", "<|end|>")),
    "gemma-2": Family(GEMMA2_TEMPLATE, "<bos>", "<eos>", "<unk>", "<pad>",
                      specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), adds_bos=True,
                      stops=("<eos>", "<end_of_turn>")),
    "gemma-3": Family(GEMMA3_TEMPLATE, "<bos>", "<eos>", "<unk>", "<pad>",
                      specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                                "<start_of_image>"), adds_bos=True, stops=("<eos>", "<end_of_turn>")),
    "olmo-2": Family(OLMO2_TEMPLATE, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>", "<|pad|>",
                     specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")),
    "smollm2": Family(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>",
                      specials=("<|endoftext|>",) + CHATML),
    "smollm3": Family(SMOLLM3_TEMPLATE, None, "<|im_end|>", pad="<|im_end|>",
                      specials=("<|begin_of_text|>", "<|end_of_text|>") + CHATML,
                      plain=("<think>", "</think>", "<tool_call>", "</tool_call>"), tools=True,
                      options=({}, {"enable_thinking": False})),
    "llama-3": Family(LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", specials=LLAMA3, adds_bos=True),
    "llama-3.1": Family(LLAMA31_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", specials=LLAMA3, adds_bos=True,
                        stops=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), tools=True,
                        options=({}, DATE, {**DATE, "tools_in_user_message": False})),
    "llama-3.2": Family(LLAMA32_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", specials=LLAMA3, adds_bos=True,
                        stops=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), tools=True, options=({}, DATE)),
    "qwen2.5": Family(QWEN25_TEMPLATE, None, "<|im_end|>", pad="<|endoftext|>", specials=("<|endoftext|>",) + CHATML,
                      plain=("<tool_call>", "</tool_call>"), stops=("<|im_end|>", "<|endoftext|>"), tools=True),
    "qwen3": Family(QWEN3_TEMPLATE, None, "<|im_end|>", pad="<|endoftext|>", specials=("<|endoftext|>",) + CHATML,
                    plain=("<tool_call>", "</tool_call>", "<think>", "</think>"), stops=("<|im_end|>", "<|endoftext|>"),
                    tools=True, options=({}, {"enable_thinking": False}, {"enable_thinking": True})),
    "hermes-2-pro": Family(HERMES_DEFAULT_TEMPLATE, "<|begin_of_text|>", "<|im_end|>",
                           specials=LLAMA3[:2] + CHATML, plain=("<tool_call>", "</tool_call>"), adds_bos=True,
                           tools=True, tool_template=HERMES2_PRO_TOOL_USE_TEMPLATE),
}
