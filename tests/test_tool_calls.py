"""Tool calling in chat, without Ray: the parsers on known replies of each family (whole and
streamed in every chunking), template detection, tools and histories rendered exactly as
transformers' apply_chat_template(tools=...) renders them, and whole requests against the
scripted tool models (tests/tool_models.py), streamed replies accumulated by the openai
library's own stream state."""

from __future__ import annotations

import json

import jsonschema
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk
from segserve.deploy.tool_parsers import (
    PARSERS,
    ToolCall,
    detect_tool_parser,
    parse_tool_calls,
)
from segserve.models.demo import CHAT_TEMPLATE
from service_harness import InProcessService
from tool_models import FAMILIES, PARIS, TIME_TOOL, WEATHER_TOOL, make_tool_model

W = {"city": "Paris"}
CALL_W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'

# (text, content, [(name, arguments)]) per parser: replies as the families' models write them.
KNOWN = {
    "hermes": [
        (f"<tool_call>\n{CALL_W}\n</tool_call>", None, [("get_weather", W)]),
        (f"Let me look.\n<tool_call>\n{CALL_W}\n</tool_call>\n<tool_call>\n"
         '{"name": "get_time", "arguments": {}}\n</tool_call>', "Let me look.",
         [("get_weather", W), ("get_time", {})]),
        ("No tools needed: 2 < 3.", "No tools needed: 2 < 3.", []),
        (f"<tool_call>\n{CALL_W}", None, [("get_weather", W)]),  # cut off before the end tag
        ("<tool_call>\n{not json}\n</tool_call> sorry", "<tool_call>\n{not json}\n</tool_call>"
         " sorry", []),
        ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None,
         [("f", {"a": 1})]),  # arguments as JSON text
        ("Ends with a partial <tool_c", "Ends with a partial <tool_c", []),
        ('Ünïcode <tool_call>{"name": "f", "arguments": {"q": "東京"}}</tool_call>', "Ünïcode",
         [("f", {"q": "東京"})]),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", W)]),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
         [("get_weather", W)]),
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
         '{"name": "get_time", "arguments": {}}', None, [("get_weather", W), ("get_time", {})]),
        ("The weather is fine.", "The weather is fine.", []),
        ('{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
        ('{"name": "get_weather", "parameters": {"ci', '{"name": "get_weather", "parameters": '
         '{"ci', []),  # cut off: the text, as it is
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', None,
         [("get_weather", W)]),
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
         '{"name": "get_time", "arguments": {}}]', None, [("get_weather", W), ("get_time", {})]),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', None, [("get_weather", W)]),
        ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}', None,
         [("get_weather", W), ("get_time", {})]),
        ('Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "Sure.",
         [("get_weather", W)]),
        ("Plain answer.", "Plain answer.", []),
        ("[TOOL_CALLS] garbage", "[TOOL_CALLS] garbage", []),
    ],
}  # fmt: skip
CASES = [(name, *case) for name, cases in KNOWN.items() for case in cases]


def _exact(calls: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    return [(name, json.dumps(args, ensure_ascii=False)) for name, args in calls]


def _streamed(parser_name: str, text: str, size: int) -> tuple[str | None, list[ToolCall]]:
    parser = PARSERS[parser_name]()
    events = []
    for i in range(0, len(text), size):
        events += parser.feed(text[i:i + size])
    events += parser.finish()
    calls = [e for e in events if isinstance(e, ToolCall)]
    content = "".join(e for e in events if isinstance(e, str))
    return (content or None) if calls else content, calls


@pytest.mark.parametrize("parser, text, content, calls", CASES)
def test_parser_on_known_replies(parser, text, content, calls):
    got_content, got_calls = parse_tool_calls(PARSERS[parser](), text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == _exact(calls)
    assert len({c.id for c in got_calls}) == len(got_calls)
    for size in (1, 2, 5, len(text)):
        streamed, streamed_calls = _streamed(parser, text, size)
        assert streamed == content, size
        assert [(c.name, c.arguments) for c in streamed_calls] == _exact(calls), size


def test_mistral_call_ids_fit_its_templates():
    _, calls = parse_tool_calls(PARSERS["mistral"](), KNOWN["mistral"][1][0])
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)
    _, calls = parse_tool_calls(PARSERS["hermes"](), KNOWN["hermes"][0][0])
    assert calls[0].id.startswith("call_")


@pytest.mark.parametrize("family", FAMILIES)
def test_detect_parser_from_template(family):
    assert detect_tool_parser(FAMILIES[family].template) == family


def test_detect_no_parser():
    assert detect_tool_parser(CHAT_TEMPLATE) is None
    assert detect_tool_parser(None) is None


# ----- the scripted models, served in process --------------------------------------------------
@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    models = [{"name": fam, "path": str(make_tool_model(tmp_path_factory.mktemp(fam), fam)),
               "dtype": "float32", "max_model_len": 4096} for fam in FAMILIES]  # fmt: skip
    models.append({"name": "demo", "path": "demo", "dtype": "float32", "max_model_len": 512})
    return InProcessService({"models": models, "pools": [
        {"name": "cpu", "device": "cpu", "num_replicas": 1, "num_kv_blocks": 512,
         "max_num_seqs": 4, "max_num_batched_tokens": 512}]})  # fmt: skip


pytestmark = pytest.mark.asyncio(loop_scope="module")

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY_OPENAI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris, and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcdefgh1", "type": "function",
         "function": {"name": "get_weather", "arguments": json.dumps(PARIS)}}]},
    {"role": "tool", "tool_call_id": "abcdefgh1", "content": "18 C, cloudy"},
    {"role": "user", "content": "And tomorrow?"},
]  # fmt: skip
# What the templates are written for (and what transformers' docs pass): arguments as objects.
HISTORY_TEMPLATE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris, and the time?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "abcdefgh1", "type": "function",
         "function": {"name": "get_weather", "arguments": PARIS}}]},
    {"role": "tool", "tool_call_id": "abcdefgh1", "content": "18 C, cloudy"},
    {"role": "user", "content": "And tomorrow?"},
]  # fmt: skip


def hf_prompt_ids(svc, family: str, messages, tools) -> list[int]:
    tok = svc.core.models[family].tokenizer
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                   tokenize=False)  # fmt: skip
    return list(tok(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tools", [[WEATHER_TOOL], [WEATHER_TOOL, TIME_TOOL]])
async def test_tools_and_history_render_as_transformers_does(svc, family, tools):
    for openai_msgs, template_msgs in ((ASK, ASK), (HISTORY_OPENAI, HISTORY_TEMPLATE)):
        status, body = await svc.post("/v1/chat/completions", {
            "model": family, "messages": openai_msgs, "tools": tools, "max_tokens": 1})
        assert status == 200, body
        want = hf_prompt_ids(svc, family, template_msgs, tools)
        assert body["usage"]["prompt_tokens"] == len(want)
        prep = svc.core.prepare(family, {"max_tokens": 1}, messages=[
            m.as_template_input() for m in _parse_messages(openai_msgs)],
            template_kwargs={"add_generation_prompt": True, "tools": tools})
        assert prep.prompt_ids == want


def _parse_messages(messages):
    from segserve.deploy.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate({"model": "m", "messages": messages}).messages


def accumulate(events: list) -> dict:
    """A streamed reply as the openai library's stream state assembles it."""
    state = ChatCompletionStreamState()
    assert events[-1] == "[DONE]"
    for chunk in events[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.get_final_completion().model_dump()


def _message_calls(message) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"])
            for c in message.get("tool_calls") or []]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tool_choice", [None, "auto"])
async def test_tool_calls_parsed_whole_and_streamed(svc, family, tool_choice):
    fam = FAMILIES[family]
    req = {"model": family, "messages": ASK, "tools": [WEATHER_TOOL, TIME_TOOL],
           "temperature": 0}  # fmt: skip
    if tool_choice is not None:
        req["tool_choice"] = tool_choice
    status, body = await svc.post("/v1/chat/completions", req)
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == fam.content
    assert _message_calls(choice["message"]) == _exact(list(fam.calls))
    assert all(c["type"] == "function" and c["id"] for c in choice["message"]["tool_calls"])

    _, events = await svc.post("/v1/chat/completions", {**req, "stream": True})
    streamed = accumulate(events)["choices"][0]
    assert streamed["finish_reason"] == "tool_calls"
    assert streamed["message"]["content"] == fam.content
    assert _message_calls(streamed["message"]) == _exact(list(fam.calls))
    # OpenAI's delta shape: the first delta of a call names it, the next carries arguments
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    firsts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in
              d["tool_calls"][0]]  # fmt: skip
    assert [(f["index"], f["function"]["name"], f["function"]["arguments"]) for f in firsts] == [
        (k, name, "") for k, (name, _) in enumerate(fam.calls)]


# Bounded arguments, so a random model's constrained reply always fits in max_tokens.
BOUNDED_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}}}},
]  # fmt: skip
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in BOUNDED_TOOLS}


def _check_forced(message, names: set[str], parallel: bool) -> None:
    calls = _message_calls(message)
    assert calls and (parallel or len(calls) == 1), message
    for name, arguments in calls:
        assert name in names
        jsonschema.validate(json.loads(arguments), TOOL_SCHEMAS[name])


@pytest.mark.parametrize("model", [*FAMILIES, "demo"])
@pytest.mark.parametrize("tool_choice", ["required", "named"])
async def test_required_and_named_tool_choice_always_yield_a_valid_call(svc, model, tool_choice):
    """The reply is constrained to calls (a JSON grammar), whatever the model would say and
    whatever its own call format: a random model still answers with calls that parse and
    whose arguments validate against the tool's parameters."""
    named = tool_choice == "named"
    req = {"model": model, "messages": ASK, "tools": BOUNDED_TOOLS, "n": 3,
           "temperature": 1.0, "seed": 5, "max_tokens": 200,
           "tool_choice": ({"type": "function", "function": {"name": "get_weather"}}
                           if named else "required")}  # fmt: skip
    names = {"get_weather"} if named else set(TOOL_SCHEMAS)
    for parallel in (True, False):
        status, body = await svc.post("/v1/chat/completions",
                                      {**req, "parallel_tool_calls": parallel})
        assert status == 200, body
        for choice in body["choices"]:
            assert choice["finish_reason"] == "tool_calls"
            assert choice["message"]["content"] is None
            _check_forced(choice["message"], names, parallel or named)
    _, events = await svc.post("/v1/chat/completions", {**req, "n": 1, "stream": True})
    streamed = accumulate(events)["choices"][0]
    assert streamed["finish_reason"] == "tool_calls"
    _check_forced(streamed["message"], names, True)


@pytest.mark.parametrize("family", FAMILIES)
async def test_tool_choice_none_leaves_the_text(svc, family):
    for tools in ([WEATHER_TOOL], None):
        req = {"model": family, "messages": ASK, "tool_choice": "none", "temperature": 0}
        if tools:
            req["tools"] = tools
        status, body = await svc.post("/v1/chat/completions", req)
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
        assert choice["message"]["content"] == FAMILIES[family].plain_text


async def test_parallel_tool_calls_false_keeps_the_first(svc):
    req = {"model": "hermes", "messages": ASK, "tools": [WEATHER_TOOL, TIME_TOOL],
           "parallel_tool_calls": False}  # fmt: skip
    _, body = await svc.post("/v1/chat/completions", req)
    assert [n for n, _ in _message_calls(body["choices"][0]["message"])] == ["get_weather"]
    _, events = await svc.post("/v1/chat/completions", {**req, "stream": True})
    calls = accumulate(events)["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]


@pytest.mark.parametrize("fields, status, param", [
    ({"model": "demo", "tools": [WEATHER_TOOL]}, 400, "tools"),  # no parser for its template
    ({"model": "hermes", "tool_choice": "required"}, 400, "tool_choice"),  # no tools
    ({"model": "hermes", "tools": [WEATHER_TOOL],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400,
     "tool_choice.function.name"),
    ({"model": "hermes", "tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     400, "tools.0.function.name"),
    ({"model": "hermes", "tools": [{"type": "retrieval"}]}, 400, "tools.0.type"),
    ({"model": "hermes", "tool_choice": "sometimes"}, 400, "tool_choice"),
    ({"model": "hermes", "functions": [{"name": "f"}]}, 400, "functions"),
])  # fmt: skip
async def test_bad_tool_requests(svc, fields, status, param):
    got, body = await svc.post("/v1/chat/completions", {"messages": ASK, **fields})
    assert (got, body["error"]["param"]) == (status, param), body


async def test_demo_model_with_tool_choice_none_is_served(svc):
    status, _ = await svc.post("/v1/chat/completions", {
        "model": "demo", "messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": "none",
        "max_tokens": 2})  # fmt: skip
    assert status == 200


async def test_arguments_nested_past_jsons_depth_are_text_not_a_500(svc):
    # Found by the gRPC fuzzer: json.loads raised RecursionError (not ValueError) on a history
    # call's arguments, and the request failed INTERNAL. They go to the template as text.
    deep = "[" * 1100 + "]" * 1100  # past the interpreter's 1,000 frames
    history = [*HISTORY_OPENAI[:2], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcdefgh1", "type": "function",
         "function": {"name": "get_weather", "arguments": deep}}]}, *HISTORY_OPENAI[3:]]
    status, body = await svc.post("/v1/chat/completions", {
        "model": sorted(FAMILIES)[0], "messages": history, "tools": [WEATHER_TOOL],
        "max_tokens": 1})  # fmt: skip
    assert status == 200, body


def test_history_arguments_too_deep_for_the_template_are_text_whatever_the_recursion_limit():
    """torch's compiler raises the recursion limit to 2,000 in the process that compiles: then
    json.loads parses 1,100 levels, and the template's renderer failed on them (a 400 found in
    CI). The depth bound, not the interpreter's limit, decides."""
    import sys

    from segserve.actors.structured import json_depth
    from segserve.deploy.protocol import MAX_TEMPLATE_JSON_DEPTH, ToolCallIn

    assert [json_depth(v) for v in (1, "[", [], {"a": [1, {"b": []}]}, [[[]]])] == [0, 0, 1, 4, 3]
    deep = "[" * 1100 + "]" * 1100
    at_bound = "[" * MAX_TEMPLATE_JSON_DEPTH + "]" * MAX_TEMPLATE_JSON_DEPTH
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(5000)
    try:
        def template_args(arguments: str) -> object:
            call = ToolCallIn.model_validate({"id": "abcdefgh1", "function": {
                "name": "get_weather", "arguments": arguments}})  # fmt: skip
            return call.as_template_input()["function"]["arguments"]

        assert template_args(deep) == deep
        assert json_depth(template_args(at_bound)) == MAX_TEMPLATE_JSON_DEPTH
        assert template_args('{"city": "Paris"}') == {"city": "Paris"}
    finally:
        sys.setrecursionlimit(limit)


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_a_reply_nested_past_jsons_depth_is_content(parser):
    # a model's reply (random weights, a long max_tokens) can open brackets past json's depth
    for text in ("[" * 5000, "<tool_call>" + "[" * 5000 + "</tool_call>",
                 '[{"name": "f", "arguments": ' + "[" * 5000 + "]" * 5000 + "}]"):
        content, calls = parse_tool_calls(PARSERS[parser](), text)
        assert calls == [] and content, (parser, text[:40])
