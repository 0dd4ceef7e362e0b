"""Tiny models whose chat templates support tools, and whose replies are scripted.

One per tool-call family (Hermes/Qwen ``<tool_call>``, Llama 3.x JSON, Mistral
``[TOOL_CALLS]``), with a chat template written after the family's own (same tool rendering,
same history handling, shortened system prompts). Each reply piece of the family's script is one
added token, and the weights make the model a bigram machine: every layer's output projections
are zero, so the last hidden state is the current token's embedding, and the LM head maps each
script token's (orthonormal) embedding to the next one. Greedy or sampled, the model says the
script after any prompt, which is what a parser test needs from a live model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}  # fmt: skip
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}  # fmt: skip
PARIS = {"city": "Paris", "unit": "celsius"}

QWEN_TEMPLATE = """
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
""".strip()

LLAMA3_TEMPLATE = """
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools is not none %}
    {%- set first_user_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {{- message.content }}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
""".strip()

MISTRAL_TEMPLATE = """
{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {%- if tools is not none and loop.last %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {{- tool | tojson }}
                {%- if not loop.last %}{{- ", " }}{%- endif %}
            {%- endfor %}
            {{- "][/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {{- "[INST] " + message['content'] + "[/INST]" }}
    {%- elif message['role'] == 'system' %}
        {{- "[INST] " + message['content'] + "[/INST]" }}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {{- '{"name": "' + tool_call.function.name + '", "arguments": ' + tool_call.function.arguments | tojson + ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}{{- ", " }}{%- endif %}
        {%- endfor %}
        {{- "]" + eos_token }}
    {%- elif message['role'] == 'assistant' %}
        {{- " " + message['content'] + eos_token }}
    {%- elif message['role'] == 'tool' %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content|tojson + ', "call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- endif %}
{%- endfor %}
""".strip()


def _call_json(name: str, args: dict, key: str = "arguments") -> str:
    return json.dumps({"name": name, key: args})


@dataclass(frozen=True)
class Family:
    parser: str
    template: str
    special: tuple[str, ...]  # special tokens the template uses (EOS is the script's last)
    script: tuple[str, ...]  # the reply, one added token per piece
    content: str | None  # what the parser makes of the script
    calls: tuple[tuple[str, dict], ...]
    # The script as the service decodes it with special tokens skipped (no parser).
    plain_text: str


FAMILIES = {
    "hermes": Family(
        "hermes", QWEN_TEMPLATE, ("<|im_start|>", "<|im_end|>"),
        ("Let me check.", "<tool_call>", "\n" + _call_json("get_weather", PARIS) + "\n",
         "</tool_call>", "\n<tool_call>\n" + _call_json("get_time", {"zone": "CET"})
         + "\n</tool_call>", "<|im_end|>"),
        "Let me check.", (("get_weather", PARIS), ("get_time", {"zone": "CET"})),
        "Let me check.<tool_call>\n" + _call_json("get_weather", PARIS) + "\n</tool_call>\n"
        "<tool_call>\n" + _call_json("get_time", {"zone": "CET"}) + "\n</tool_call>",
    ),
    "llama3_json": Family(
        "llama3_json", LLAMA3_TEMPLATE,
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>",
         "<|eot_id|>"),
        (_call_json("get_weather", PARIS, "parameters"), "<|eot_id|>"),
        None, (("get_weather", PARIS),), _call_json("get_weather", PARIS, "parameters"),
    ),
    "mistral": Family(
        "mistral", MISTRAL_TEMPLATE,
        ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
         "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
        ("[TOOL_CALLS]", json.dumps([{"name": "get_weather", "arguments": PARIS}]), "</s>"),
        None, (("get_weather", PARIS),), json.dumps([{"name": "get_weather", "arguments": PARIS}]),
    ),
}  # fmt: skip


def make_tool_model(path: Path, family: str, seed: int = 0) -> Path:
    """Save the scripted model of ``family`` (see the module docstring) to ``path``."""
    from segserve.models.demo import build_tokenizer
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, LlamaConfig

    fam = FAMILIES[family]
    tok = build_tokenizer(512)
    tok.add_special_tokens({"additional_special_tokens": list(fam.special)})
    tok.add_tokens([AddedToken(p, normalized=False) for p in fam.script
                    if p not in tok.get_vocab()])  # fmt: skip
    tok.chat_template = fam.template
    eos = tok.convert_tokens_to_ids(fam.script[-1])
    if family == "llama3_json":
        tok.bos_token = "<|begin_of_text|>"
    tok.eos_token = fam.script[-1]

    # The generation prompt's last token starts the script.
    gen = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                  add_generation_prompt=True)  # fmt: skip
    start = tok(gen, add_special_tokens=False).input_ids[-1]
    chain = [start] + [tok.convert_tokens_to_ids(p) for p in fam.script]
    assert len(set(chain)) == len(chain), "a bigram script cannot repeat a token"

    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                         eos_token_id=eos, pad_token_id=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.normal_(0.0, 0.02)
        basis, _ = torch.linalg.qr(torch.randn(64, len(chain)))
        head = model.lm_head.weight
        head.zero_()
        for k, (cur, nxt) in enumerate(zip(chain, chain[1:], strict=False)):
            emb[cur] = basis[:, k]  # unit norm: the final RMSNorm makes it 8x that
            head[nxt] = 4.0 * basis[:, k]  # logit 32 for the next piece, 0 for the rest
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
