"""The OpenAI wire format (deploy/protocol.py): strict request parsing, the mapping to
SamplingParams kwargs, errors, and the log-prob bodies."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from pydantic import ValidationError
from segserve import SamplingParams
from segserve.deploy import protocol
from segserve.deploy.errors import APIError, engine_error_param
from segserve.deploy.protocol import ChatCompletionRequest, CompletionRequest
from segserve.deploy.responses import chat_logprobs, completion_logprobs


def comp(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate_json(
        json.dumps({"model": "m", "prompt": "hi", **fields})
    )


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate_json(json.dumps(body))


def api_error(fn, *args) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)
    return info.value


def field_errors(exc: ValidationError) -> set[tuple]:
    return {(e["loc"], e["type"]) for e in exc.errors()}


# ----- strict parsing --------------------------------------------------------------------------
@pytest.mark.parametrize("make", [comp, chat])
def test_string_number_rejected(make):
    with pytest.raises(ValidationError) as info:
        make(max_tokens="8")
    assert field_errors(info.value) == {(("max_tokens",), "int_type")}


@pytest.mark.parametrize("make", [comp, chat])
def test_bool_for_int_rejected(make):
    with pytest.raises(ValidationError) as info:
        make(n=True)
    assert field_errors(info.value) == {(("n",), "int_type")}


def test_float_for_int_rejected():
    with pytest.raises(ValidationError) as info:
        comp(max_tokens=8.0)
    assert field_errors(info.value) == {(("max_tokens",), "int_type")}


def test_int_accepted_for_float():
    r = comp(temperature=1, top_p=1, presence_penalty=0)
    assert r.temperature == 1.0 and isinstance(r.temperature, float)
    assert r.sampling() == {"n": 1, "temperature": 1.0, "top_p": 1.0, "presence_penalty": 0.0}


@pytest.mark.parametrize("make", [comp, chat])
def test_unknown_fields_are_ignored_with_one_warning_per_name(make, caplog):
    protocol._warned_fields.clear()
    with caplog.at_level(logging.WARNING, logger="segserve.deploy.protocol"):
        r = make(max_token=8, reasoning_effort="low", stream_options={"chunk_size": 2})
        make(max_token=9)  # the same name again: no second line
    assert r.sampling() == {"n": 1}  # nothing of them reaches the engine
    warned = sorted(rec.getMessage() for rec in caplog.records)
    assert warned == [
        f"ignoring unknown request field {name!r} (logged once per field name)"
        for name in sorted(["max_token", "reasoning_effort", "stream_options.chunk_size"])
    ]


def test_unknown_message_fields_reach_the_template():
    r = chat(messages=[{"role": "assistant", "content": "x", "reasoning_content": "hmm"}])
    assert r.template_messages() == [
        {"role": "assistant", "content": "x", "reasoning_content": "hmm"}
    ]


def test_ignored_fields_accepted():
    r = comp(user="u1", metadata={"k": "v"}, store=False, service_tier="auto")
    assert r.sampling() == {"n": 1}  # they change nothing (n always has its default 1)
    c = chat(user="u1", metadata={"k": "v"}, parallel_tool_calls=False)
    assert c.sampling() == {"n": 1}


def test_missing_or_empty_model():
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate_json('{"prompt": "x"}')
    with pytest.raises(ValidationError):
        comp(model="")


def test_bad_role_and_device():
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(ValidationError):
        comp(device="tpu")
    assert comp(device="cpu").device == "cpu"
    assert comp().device == "auto"


# ----- sampling() ------------------------------------------------------------------------------
def test_sampling_only_set_fields():
    r = comp(n=2, max_tokens=8, temperature=0.5, top_k=4, seed=7, ignore_eos=True,
             stop_token_ids=[3], early_stopping="never", beam_width=2)  # fmt: skip
    assert r.sampling() == {
        "n": 2,
        "max_tokens": 8,
        "temperature": 0.5,
        "top_k": 4,
        "seed": 7,
        "ignore_eos": True,
        "stop_token_ids": [3],
        "early_stopping": "never",
        "beam_width": 2,
    }


def test_stop_string_becomes_a_list():
    assert comp(stop="\n").sampling() == {"n": 1, "stop": ["\n"]}
    assert comp(stop=["a", "b"]).sampling() == {"n": 1, "stop": ["a", "b"]}


def test_completion_logprobs():
    assert comp(logprobs=3).sampling() == {"n": 1, "logprobs": 3}
    assert comp(logprobs=0).sampling() == {"n": 1, "logprobs": 0}


def test_max_completion_tokens():
    assert chat(max_completion_tokens=5).sampling() == {"n": 1, "max_tokens": 5}
    # the newer name wins over the deprecated one
    assert chat(max_tokens=9, max_completion_tokens=5).sampling() == {"n": 1, "max_tokens": 5}
    assert chat(max_tokens=9).sampling() == {"n": 1, "max_tokens": 9}


def test_chat_logprobs():
    assert chat(logprobs=True, top_logprobs=4).sampling() == {"n": 1, "logprobs": 4}
    assert chat(logprobs=True).sampling() == {"n": 1, "logprobs": 0}
    assert chat(logprobs=False).sampling() == {"n": 1}
    e = api_error(chat(top_logprobs=2).sampling)
    assert (e.status, e.param) == (400, "top_logprobs")
    assert chat(top_logprobs=0).sampling() == {"n": 1}  # what some SDKs send by default


def test_logit_bias():
    assert comp(logit_bias={}).sampling() == {"n": 1}
    assert comp(logit_bias={"50256": -100}).sampling() == {"n": 1, "logit_bias": {50256: -100}}
    assert chat(logit_bias={"1": 1}).sampling()["logit_bias"] == {1: 1}


def test_include_usage():
    assert not comp().include_usage
    assert not comp(stream=True, stream_options={"include_usage": False}).include_usage
    assert comp(stream=True, stream_options={"include_usage": True}).include_usage
    with pytest.raises(ValidationError):
        comp(stream_options={"include_usage": "yes"})


def test_continuous_usage_stats():
    r = comp(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert r.include_usage and r.continuous_usage
    assert not comp(stream=True).continuous_usage


# ----- null, ranges, constraints ----------------------------------------------------------------
def _nullable(schema) -> list[str]:
    return [name for name, f in schema.model_fields.items() if not f.is_required()]


@pytest.mark.parametrize("make, schema", [(comp, CompletionRequest), (chat, ChatCompletionRequest)])
def test_null_means_default_for_every_nullable_field(make, schema):
    names = _nullable(schema)
    assert {"n", "stream", "echo", "logprobs", "temperature", "stream_options"} & set(names)
    default = make()
    for name in names:
        assert make(**{name: None}) == default, name
    # all at once, as an SDK that sends every unset field as null does
    assert make(**dict.fromkeys(names)) == default
    assert make(stream_options={"include_usage": None}).stream_options.include_usage is False


def test_null_in_a_required_field_is_an_error():
    with pytest.raises(ValidationError) as info:
        comp(model=None)
    assert field_errors(info.value) == {(("model",), "string_type")}
    with pytest.raises(ValidationError):
        comp(prompt=None)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": 2.1}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"best_of": 0}, "best_of"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ],
)
def test_openai_ranges(fields, param):
    with pytest.raises(ValidationError) as info:
        comp(**fields)
    assert [e["loc"] for e in info.value.errors()] == [(param,)]


def test_range_edges_accepted():
    r = comp(temperature=2, top_p=1, presence_penalty=-2, frequency_penalty=2, n=128, logprobs=20)
    assert r.sampling()["temperature"] == 2.0
    with pytest.raises(ValidationError):
        chat(top_logprobs=21)


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize(
    "fields, sampling",
    [
        ({"min_tokens": 2}, {"min_tokens": 2}),
        ({"prompt_logprobs": 0}, {"prompt_logprobs": 0}),
        ({"max_tokens": 0}, {"max_tokens": 0}),
        ({"logit_bias": {"7": 5.0}}, {"logit_bias": {7: 5.0}}),
        ({"allowed_token_ids": [1, 2]}, {"allowed_token_ids": [1, 2]}),
        ({"bad_words": ["x"]}, {"bad_words": ["x"]}),
        ({"guided_json": SCHEMA}, {"structured": {"json": SCHEMA}}),
        ({"guided_json": '{"type": "string"}'}, {"structured": {"json": '{"type": "string"}'}}),
        ({"guided_regex": "a+"}, {"structured": {"regex": "a+"}}),
        ({"guided_choice": ["a", "b"]}, {"structured": {"choice": ["a", "b"]}}),
        ({"guided_grammar": "root ::= 'a'"}, {"structured": {"grammar": "root ::= 'a'"}}),
        ({"structured_outputs": {"regex": "b", "disable_any_whitespace": True}},
         {"structured": {"regex": "b"}}),
        ({"response_format": {"type": "json_object"}}, {"structured": {"json_object": True}}),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
         {"structured": {"json": SCHEMA}}),
    ],
)  # fmt: skip
@pytest.mark.parametrize("make", [comp, chat])
def test_vllm_constraints_become_sampling_params(make, fields, sampling):
    assert make(**fields).sampling() == {"n": 1, **sampling}
    SamplingParams(**make(**fields).sampling())  # and the engine takes them


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logit_bias": {"x": 5.0}}, "logit_bias.x"),
        ({"logit_bias": {"-7": 5.0}}, "logit_bias.-7"),
        ({"logit_bias": {"7": 500.0}}, "logit_bias.7"),
        ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
@pytest.mark.parametrize("make", [comp, chat])
def test_bad_constraints_are_refused_by_name(make, fields, param):
    e = api_error(make(**fields).sampling)
    assert (e.status, e.param) == (400, param)


def test_constraint_fields_at_their_defaults_are_fine():
    r = comp(min_tokens=0, logit_bias={}, bad_words=[],
             response_format={"type": "text"}, spaces_between_special_tokens=False)  # fmt: skip
    assert r.sampling() == {"n": 1}
    assert chat(max_completion_tokens=0).sampling()["max_tokens"] == 0


def test_echo_with_logprobs_asks_for_prompt_logprobs():
    assert comp(echo=True, logprobs=2).sampling() == {"n": 1, "logprobs": 2, "prompt_logprobs": 2}
    assert comp(echo=True, logprobs=1, prompt_logprobs=4).sampling()["prompt_logprobs"] == 4
    assert "prompt_logprobs" not in comp(echo=True).sampling()


def test_use_beam_search():
    r = comp(use_beam_search=True, n=2, best_of=4, length_penalty=0.5)
    assert r.sampling() == {"n": 1, "beam_width": 4, "length_penalty": 0.5}
    assert r.returned_choices == 2
    assert comp(use_beam_search=True, n=3).sampling()["beam_width"] == 3
    c = chat(use_beam_search=True, n=3, early_stopping=True)
    assert c.sampling() == {"n": 1, "beam_width": 3, "early_stopping": True}
    assert c.returned_choices == 3
    # segserve's own beam_width returns every beam
    assert comp(beam_width=3).returned_choices is None
    assert comp(use_beam_search=True, n=2, best_of=4).prompts() == ["hi"]


def test_engine_errors_name_their_field():
    assert engine_error_param("invalid sampling parameter top_p=0.0: must be ...") == "top_p"
    assert engine_error_param("prompt token id 9 is outside the model's vocabulary") == "prompt"
    assert engine_error_param("the request needs up to 9 KV blocks but the pool") == "max_tokens"
    assert engine_error_param("n/beam_width 9 exceeds max_num_seqs 8") == "n"
    assert engine_error_param("something else") is None


# ----- prompts(), best_of -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("hello", ["hello"]),
        ([1, 2, 3], [[1, 2, 3]]),
        (["hello"], ["hello"]),
        ([[4, 5]], [[4, 5]]),
        (["a", "b c"], ["a", "b c"]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_prompts(prompt, expected):
    assert comp(prompt=prompt).prompts() == expected


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [""]}, "prompt.0"),
        ({"prompt": ["a", ""]}, "prompt.1"),
        ({"prompt": [[1], []]}, "prompt.1"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": 3, "stream": True}, "best_of"),
    ],
)
def test_prompts_refused(fields, param):
    e = api_error(comp(**fields).prompts)
    assert (e.status, e.param) == (400, param)


def test_best_of():
    assert comp(best_of=3, n=3).prompts() == ["hi"]
    assert comp(suffix="").prompts() == ["hi"]
    r = comp(best_of=4, n=2)
    assert r.ranks_by_logprob and r.returned_choices == 2 and r.choices_per_prompt == 2
    assert r.sampling() == {"n": 4, "logprobs": 0}  # log-probs for the ranking
    assert comp(best_of=4, n=2, logprobs=3).sampling() == {"n": 4, "logprobs": 3}
    assert comp(best_of=3, n=3).sampling() == {"n": 3}
    # best_of = n streams; best_of with beam search is the beam width
    assert comp(best_of=2, n=2, stream=True).prompts() == ["hi"]
    assert not comp(best_of=4, n=2, use_beam_search=True).ranks_by_logprob


def test_choices_per_prompt():
    assert comp(n=3).choices_per_prompt == 3
    assert comp(beam_width=4).choices_per_prompt == 4  # every beam
    assert comp(use_beam_search=True, n=2, best_of=5).choices_per_prompt == 2


def test_prompt_of_mixed_types_rejected():
    with pytest.raises(ValidationError):
        comp(prompt=[1, "a"])
    with pytest.raises(ValidationError):
        comp(prompt=7)
    with pytest.raises(ValidationError):
        comp(prompt=["a", [1]])


# ----- template_messages() ---------------------------------------------------------------------
def test_template_messages():
    r = chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ])  # fmt: skip
    assert r.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]


def test_template_messages_refused():
    e = api_error(chat(messages=[]).template_messages)
    assert (e.status, e.param) == (400, "messages")


def test_template_messages_accepted_options():
    out = [{"role": "user", "content": "hi"}]
    assert chat(tools=[], tool_choice="none").template_messages() == out
    assert chat(response_format={"type": "text"}).template_messages() == out


def test_image_part_rejected():
    with pytest.raises(ValidationError):
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_template_kwargs():
    assert chat().template_kwargs() == {"add_generation_prompt": True,
                                        "continue_final_message": False}
    r = chat(add_generation_prompt=False, continue_final_message=True, chat_template="{{ x }}",
             documents=[{"title": "t", "text": "d"}],
             chat_template_kwargs={"enable_thinking": False, "add_generation_prompt": False})
    assert r.template_kwargs() == {
        "add_generation_prompt": False, "continue_final_message": True,
        "chat_template": "{{ x }}", "documents": [{"title": "t", "text": "d"}],
        "enable_thinking": False,
    }  # fmt: skip
    e = api_error(chat(continue_final_message=True).template_kwargs)  # with the generation prompt
    assert (e.status, e.param) == (400, "continue_final_message")
    e = api_error(chat(chat_template_kwargs={"tokenize": True}).template_kwargs)
    assert (e.status, e.param) == (400, "chat_template_kwargs.tokenize")


def test_template_kwargs_set_the_generation_prompt_fields():
    # They become the fields (the echo reads them too), so the fields' checks apply.
    r = chat(chat_template_kwargs={"add_generation_prompt": False, "continue_final_message": True,
                                   "enable_thinking": True})  # fmt: skip
    assert (r.add_generation_prompt, r.continue_final_message) == (False, True)
    assert r.template_kwargs() == {"add_generation_prompt": False, "continue_final_message": True,
                                   "enable_thinking": True}  # fmt: skip
    e = api_error(chat(chat_template_kwargs={"continue_final_message": True}).template_kwargs)
    assert (e.status, e.param) == (400, "continue_final_message")  # with the generation prompt
    def with_kwargs(kwargs: dict) -> ChatCompletionRequest:
        return chat(chat_template_kwargs=kwargs)

    for key, value in [("add_generation_prompt", "no"), ("continue_final_message", 1)]:
        e = api_error(with_kwargs, {key: value})
        assert (e.status, e.param) == (400, f"chat_template_kwargs.{key}")
    e = api_error(with_kwargs, {"tools": [{"type": "function"}]})
    assert (e.status, e.param) == (400, "chat_template_kwargs.tools")


@pytest.mark.parametrize(
    "last_role, add_generation_prompt, echoed",
    [("user", True, ""), ("assistant", True, "last"), ("user", False, "last"),
     ("assistant", False, "last")],
)  # fmt: skip
def test_chat_echo_prefix(last_role, add_generation_prompt, echoed):
    msgs = [{"role": "user", "content": "first"}, {"role": last_role, "content": "last"}]
    r = chat(messages=msgs, echo=True, add_generation_prompt=add_generation_prompt)
    assert r.echo_prefix() == echoed
    assert chat(messages=msgs).echo_prefix() == ""


# ----- APIError --------------------------------------------------------------------------------
def test_api_error_body():
    e = APIError(400, "bad n", "n")
    assert e.body() == {
        "error": {"message": "bad n", "type": "invalid_request_error", "param": "n", "code": 400}
    }
    assert str(e) == "bad n"
    assert APIError(429, "full").body() == {
        "error": {"message": "full", "type": "rate_limit_error", "param": None, "code": 429}
    }
    assert APIError(418, "teapot").body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "status, code",
    [
        (400, "INVALID_ARGUMENT"),
        (401, "UNAUTHENTICATED"),
        (404, "NOT_FOUND"),
        (429, "RESOURCE_EXHAUSTED"),
        (500, "INTERNAL"),
        (503, "UNAVAILABLE"),
        (418, "UNKNOWN"),
    ],
)
def test_grpc_code_name(status, code):
    assert APIError(status, "x").grpc_code_name == code


def test_api_error_round_trip():
    e = APIError.from_dict(APIError(404, "no model", "model").to_dict())
    assert (e.status, e.message, e.param) == (404, "no model", "model")
    assert APIError.from_dict({"status": 500, "message": "x"}).param is None


# ----- log-prob bodies -------------------------------------------------------------------------
ENTRIES = [
    {"token": "Hé", "logprob": -0.5,
     "top": [{"token": "Hé", "logprob": -0.5}, {"token": "A", "logprob": -1.5}]},
    {"token": " world", "logprob": -0.25, "top": [{"token": " world", "logprob": -0.25}]},
    {"token": "!", "logprob": -2.0, "top": []},
]  # fmt: skip


def test_completion_logprobs_body():
    assert completion_logprobs(ENTRIES) == {
        "tokens": ["Hé", " world", "!"],
        "token_logprobs": [-0.5, -0.25, -2.0],
        "top_logprobs": [{"Hé": -0.5, "A": -1.5}, {" world": -0.25}, {}],
        # offsets in characters: 0, len("Hé") = 2, 2 + len(" world") = 8
        "text_offset": [0, 2, 8],
    }
    assert completion_logprobs([]) is None


def test_chat_logprobs_body():
    body = chat_logprobs(ENTRIES)
    first = body["content"][0]
    assert first == {
        "token": "Hé",
        "logprob": -0.5,
        "bytes": [72, 195, 169],  # UTF-8: é is two bytes
        "top_logprobs": [
            {"token": "Hé", "logprob": -0.5, "bytes": [72, 195, 169]},
            {"token": "A", "logprob": -1.5, "bytes": [65]},
        ],
    }
    assert body["content"][1]["bytes"] == list(b" world")
    assert body["content"][2] == {"token": "!", "logprob": -2.0, "bytes": [33], "top_logprobs": []}
    assert chat_logprobs([]) is None


def test_cache_salt_reaches_sampling_and_a_key_salt_cannot_be_named_into():
    from segserve.deploy.service import ServiceCore

    assert comp(cache_salt="t1").sampling() == {"n": 1, "cache_salt": "t1"}
    with pytest.raises(ValidationError):
        comp(cache_salt="")
    salt = ServiceCore.cache_salt
    assert salt(None, None) is None
    # Four spaces of salts that never meet: none, the request's, the key's, the key's + own.
    seen = {salt("t1", None), salt(None, "k"), salt("t1", "k"), salt("k", None)}
    assert len(seen) == 4 and None not in seen
    # A request cannot name the salt a key implies.
    assert salt(None, "k") not in {salt(s, None) for s in ("k", "k:k", "r:k:k")}
