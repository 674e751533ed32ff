"""Pure unit tests: request parsing/validation (every 400/404 case of issue 3 §3) and response building."""

import math

import pytest

from services.gateway import responses as R
from services.gateway.body import parse_json
from services.gateway.chat import parse_chat
from services.gateway.completion import parse_completion
from services.gateway.protocol import ModelInfo
from shared.errors import ApiError
from shared.messages import SeqOutput, StreamChunk
from tests.gateway.conftest import FakeTokenizer

USER = [{"role": "user", "content": "hi"}]


def chat(body: dict, model: ModelInfo, tok: FakeTokenizer, **kw):
    return parse_chat({"model": "test-model", "messages": USER, **body}, model, tok, **kw)


def expect(fn, status: int, param: str | None, code: str | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn()
    e = info.value
    assert (e.status, e.param) == (status, param), e.message
    if code is not None:
        assert e.code == code
    assert e.body()["error"]["message"] == e.message and e.message
    return e


# --- the body ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, code",
    [
        (b'{"a": "\xff"}', "invalid_utf8"),
        (b'{"a": "\\ud800"}', "invalid_utf8"),  # a lone surrogate: valid JSON, not text
        (b"", "invalid_json"),
        (b"   ", "invalid_json"),
        (b'{"a":', "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'"text"', "invalid_json"),
        (b'{"temperature": NaN}', "invalid_json"),
        (b'{"temperature": Infinity}', "invalid_json"),
        (b'{"temperature": 1e999}', "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b'{"n": ' + b"9" * 5000 + b"}", "invalid_json"),  # over Python's int digit limit
    ],
)
def test_bad_bodies_are_400(raw: bytes, code: str) -> None:
    e = expect(lambda: parse_json(raw), 400, None, code)
    assert e.type == "invalid_request_error"


def test_good_body_parses_with_bom_and_unicode() -> None:
    assert parse_json('\ufeff{"a": "héllo ✓"}'.encode()) == {"a": "héllo ✓"}


# --- chat --------------------------------------------------------------------------------------------


def test_chat_tokenizes_once_with_template_and_defaults_max_tokens(model, tokenizer) -> None:
    p = chat({}, model, tokenizer)
    assert p.kind == "chat" and p.prompt_token_ids == tokenizer.encode_chat(USER)
    assert p.params.max_tokens == model.max_model_len - len(p.prompt_token_ids)  # like vLLM
    assert (p.params.temperature, p.params.n, p.params.logprobs, p.stream) == (1.0, 1, None, False)


def test_chat_maps_every_sampling_parameter(model, tokenizer) -> None:
    body = {
        "max_completion_tokens": 7,
        "max_tokens": 99,
        "temperature": 0,
        "top_p": 0.5,
        "n": 2,
        "stop": "END",
        "seed": 3,
        "presence_penalty": 0.1,
        "frequency_penalty": -0.1,
        "logprobs": True,
        "top_logprobs": 4,
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.2,
        "min_tokens": 2,
        "ignore_eos": True,
        "stop_token_ids": [2],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    p = chat(body, model, tokenizer)
    sp = p.params
    assert sp.max_tokens == 7  # max_completion_tokens wins over the deprecated max_tokens
    assert (sp.temperature, sp.top_p, sp.n, sp.stop, sp.seed) == (0, 0.5, 2, ["END"], 3)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.logprobs) == (0.1, -0.1, 4)
    assert (sp.top_k, sp.min_p, sp.repetition_penalty, sp.min_tokens) == (5, 0.1, 1.2, 2)
    assert (sp.ignore_eos, sp.stop_token_ids, p.stream, p.include_usage) == (True, [2], True, True)
    assert chat({"logprobs": True}, model, tokenizer).params.logprobs == 0
    assert chat({"stop": ["a", "b"]}, model, tokenizer).params.stop == ["a", "b"]


def test_chat_uses_model_generation_defaults_unless_given(model, tokenizer) -> None:
    model.generation_defaults = {"temperature": 0.3, "top_k": 20, "max_tokens": 5}
    p = chat({}, model, tokenizer)
    assert (p.params.temperature, p.params.top_k) == (0.3, 20)
    assert p.params.max_tokens != 5  # not a sampling default
    assert chat({"temperature": 0.9}, model, tokenizer).params.temperature == 0.9


def test_chat_messages_roles_and_content_parts(model, tokenizer) -> None:
    msgs = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "c"},
    ]
    p = chat({"messages": msgs}, model, tokenizer)
    expected = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "c"},
    ]
    assert p.prompt_token_ids == tokenizer.encode_chat(expected)


def test_chat_without_model_uses_the_served_one(model, tokenizer) -> None:
    assert parse_chat({"messages": USER}, model, tokenizer).kind == "chat"


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ({"messages": None}, 400, "messages", None),
        ({"messages": []}, 400, "messages", None),
        ({"messages": "hi"}, 400, "messages", None),
        ({"messages": ["hi"]}, 400, "messages[0]", None),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
        ({"messages": [{"content": "x"}]}, 400, "messages[0].role", None),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
        ({"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content", None),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages[0].content[0]",
            None,
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            400,
            "messages[0].content[0].text",
            None,
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages", None),  # template refuses
        ({"model": 5}, 400, "model", None),
        ({"model": "gpt-4"}, 404, "model", "model_not_found"),
        ({"temperature": "hot"}, 400, "temperature", None),
        ({"temperature": -1}, 400, "temperature", None),
        ({"temperature": 10**400}, 400, "temperature", None),  # a finite JSON int too big for the wire
        ({"top_p": 0}, 400, "top_p", None),
        ({"top_p": 1.5}, 400, "top_p", None),
        ({"n": 0}, 400, "n", None),
        ({"n": "2"}, 400, "n", None),
        ({"n": 17}, 400, "n", None),  # over max_n
        ({"n": True}, 400, "n", None),
        ({"max_tokens": 0}, 400, "max_tokens", None),
        ({"max_tokens": 1.5}, 400, "max_tokens", None),
        ({"max_completion_tokens": -1}, 400, "max_completion_tokens", None),
        ({"stop": 5}, 400, "stop", None),
        ({"stop": [1]}, 400, "stop", None),
        ({"stop": ""}, 400, "stop", None),
        ({"seed": "x"}, 400, "seed", None),
        ({"seed": 2**64}, 400, "seed", None),
        ({"presence_penalty": 3}, 400, "presence_penalty", None),
        ({"frequency_penalty": -2.5}, 400, "frequency_penalty", None),
        ({"top_logprobs": 3}, 400, "top_logprobs", None),  # without logprobs=true
        ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
        ({"logprobs": True, "top_logprobs": "3"}, 400, "top_logprobs", None),
        ({"logprobs": "yes"}, 400, "logprobs", "invalid_type"),
        ({"stream": "yes"}, 400, "stream", "invalid_type"),
        ({"stream_options": {"include_usage": True}}, 400, "stream_options", None),  # without stream
        ({"stream": True, "stream_options": "usage"}, 400, "stream_options", None),
        ({"stream": True, "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage", None),
        ({"top_k": -5}, 400, "top_k", None),
        ({"min_p": 2}, 400, "min_p", None),
        ({"repetition_penalty": 0}, 400, "repetition_penalty", None),
        ({"min_tokens": -1}, 400, "min_tokens", None),
        ({"min_tokens": 10, "max_tokens": 5}, 400, "min_tokens", None),
        ({"min_tokens": 500}, 400, "min_tokens", None),  # over the default max_tokens (context left)
        ({"ignore_eos": "x"}, 400, "ignore_eos", None),
        ({"stop_token_ids": "x"}, 400, "stop_token_ids", None),
        ({"stop_token_ids": [999]}, 400, "stop_token_ids", None),  # not in the vocabulary
        ({"tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter"),
        ({"tool_choice": "required"}, 400, "tool_choice", "unsupported_parameter"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format", None),
        ({"functions": [{"name": "f"}]}, 400, "functions", "unsupported_parameter"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, "tool_choice", None),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, 400, "response_format", None),
    ],
)
def test_chat_errors(model, tokenizer, body, status, param, code) -> None:
    e = expect(lambda: chat(body, model, tokenizer), status, param, code)
    assert e.type == "invalid_request_error"


def test_prompt_plus_max_tokens_over_context_says_both_numbers(model, tokenizer) -> None:
    n_prompt = len(tokenizer.encode_chat(USER))
    e = expect(lambda: chat({"max_tokens": 250}, model, tokenizer), 400, "max_tokens", "context_length_exceeded")
    assert "256" in e.message and str(n_prompt) in e.message and "250" in e.message
    assert chat({"max_tokens": 256 - n_prompt}, model, tokenizer).params.max_tokens == 256 - n_prompt
    long = [{"role": "user", "content": "x" * 300}]
    e = expect(lambda: chat({"messages": long}, model, tokenizer), 400, "messages", "context_length_exceeded")
    assert "256" in e.message and str(len(tokenizer.encode_chat(long))) in e.message


def test_sampling_errors_keep_the_name_the_client_used(model, tokenizer) -> None:
    e = expect(lambda: chat({"max_completion_tokens": 0}, model, tokenizer), 400, "max_completion_tokens")
    assert e.message.startswith("max_completion_tokens")
    e = expect(lambda: chat({"logprobs": True, "top_logprobs": 99}, model, tokenizer), 400, "top_logprobs")
    assert e.message.startswith("top_logprobs")


# --- issue 9 §2: every field against OpenAI's documented range and type, and vLLM's extras -------------

# field -> values that both endpoints refuse with a 400 naming the field
BAD_VALUES = {
    "temperature": [9, 2.001, -0.1, "hot", True, [1]],
    "top_p": [0, 1.01, -1, "1"],
    "presence_penalty": [2.01, -2.01, "x"],
    "frequency_penalty": [3, -3, False],
    "n": [0, -1, 1.5, True, "2", 17],  # 17: over max_n
    "seed": [1.5, True, "1", 2**63, -(2**63) - 1],
    "stop": [["a", "b", "c", "d", "e"], [""], ["a", 1], {"a": 1}, 5],
    "max_tokens": [0, -5, 2.5, "5", True],
    "user": [5, {"id": "u"}, ["u"]],
    "response_format": [{"type": "json_object"}, {"type": "json_schema"}, "text", {"type": "xml"}],
    "stream": [1, "true"],
    "top_k": [-2, 1.5, "5"],
    "min_p": [-0.01, 1.01, "0"],
    "repetition_penalty": [0, -1, "2", 10**400],
    "min_tokens": [-1, 1.5, 300],  # 300: over the default max_tokens (what the context leaves)
    "stop_token_ids": [[-1], [259], ["5"], 5],
    "ignore_eos": [1],
    "skip_special_tokens": ["no"],
    "include_stop_str_in_output": [0],
    "logit_bias": [{"5": 100.5}, {"5": -101}, {"5": "10"}, {"5": True}, {"5": None}, [5, 1], "5"],
}
BAD_VALUES["logit_bias"] += [{key: 1} for key in ("abc", "-1", "5.0", "\u0665", "259", "9" * 5000)]
BAD_FIELDS = [(name, value) for name, values in BAD_VALUES.items() for value in values]


@pytest.mark.parametrize("name, value", BAD_FIELDS)
def test_out_of_range_or_mistyped_fields_are_400_naming_the_field(model, tokenizer, name, value) -> None:
    for parse in (chat, comp):
        e = expect(lambda parse=parse: parse({name: value}, model, tokenizer), 400, name)
        assert e.type == "invalid_request_error" and len(e.message) < 200


def test_range_messages_say_the_rule_and_the_value(model, tokenizer) -> None:
    e = expect(lambda: chat({"temperature": 9}, model, tokenizer), 400, "temperature")
    assert e.message == "temperature must be in [0, 2], got 9"
    e = expect(lambda: chat({"logit_bias": {"5": 150}}, model, tokenizer), 400, "logit_bias")
    assert "[-100, 100]" in e.message and "150" in e.message
    e = expect(lambda: chat({"logit_bias": {"300": 1}}, model, tokenizer), 400, "logit_bias")
    assert "'300'" in e.message and "0..258" in e.message
    e = expect(lambda: chat({"response_format": {"type": "json_object"}}, model, tokenizer), 400, "response_format")
    assert e.code == "unsupported_parameter" and "json_object" in e.message


@pytest.mark.parametrize(
    "body, param",
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 2.5}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": True}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_completion_tokens": "5"}, "max_completion_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"max_completion_tokens": 5, "max_tokens": 0}, "max_tokens"),  # the ignored alias is still checked
        ({"max_completion_tokens": 5, "max_tokens": "x"}, "max_tokens"),
        ({"max_completion_tokens": 5, "min_tokens": 6}, "min_tokens"),
    ],
)
def test_chat_only_fields_out_of_range(model, tokenizer, body, param) -> None:
    e = expect(lambda: chat(body, model, tokenizer), 400, param)
    assert e.message.startswith(param) or param in e.message


@pytest.mark.parametrize(
    "body, param",
    [
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 1.5}, "logprobs"),
        ({"logprobs": "3"}, "logprobs"),
        ({"echo": 1}, "echo"),
        ({"best_of": 1.5}, "best_of"),
        ({"best_of": True}, "best_of"),
    ],
)
def test_completion_only_fields_out_of_range(model, tokenizer, body, param) -> None:
    expect(lambda: comp(body, model, tokenizer), 400, param)


# field -> edge values both endpoints accept
GOOD_VALUES = {
    "temperature": [0, 2, 2.0],
    "top_p": [1, 1e-9],
    "presence_penalty": [2, -2],
    "frequency_penalty": [2.0, -2],
    "n": [1, 16],
    "seed": [0, 2**63 - 1, -(2**63)],
    "stop": [["a", "b", "c", "d"], "x", []],
    "max_tokens": [1],
    "user": ["user-1", ""],
    "response_format": [{"type": "text"}],
    "stream": [False],
    "top_k": [-1, 0, 1],
    "min_p": [0, 1],
    "repetition_penalty": [0.01, 5],
    "min_tokens": [0],
    "stop_token_ids": [[0, 258]],
    "skip_special_tokens": [False],
    "include_stop_str_in_output": [True],
    "logit_bias": [{}, {"0": -100, "258": 100}, {"5": 0.5, "6": -7}],
    "tools": [[]],
    "tool_choice": ["none"],
}
GOOD_EDGES = [{name: value} for name, values in GOOD_VALUES.items() for value in values]
GOOD_EDGES.append({"min_tokens": 3, "max_tokens": 3})


@pytest.mark.parametrize("body", GOOD_EDGES)
def test_edge_values_are_accepted(model, tokenizer, body) -> None:
    for parse in (chat, comp):
        parse(body, model, tokenizer)


def test_logit_bias_reaches_sampling_params_with_int_keys(model, tokenizer) -> None:
    p = chat({"logit_bias": {"0": -100, "258": 100, "5": 2.5}}, model, tokenizer)
    assert p.params.logit_bias == {0: -100, 258: 100, 5: 2.5}
    assert p.params.to_dict()["logit_bias"] == {0: -100, 258: 100, 5: 2.5}
    assert comp({"logit_bias": {"7": 1}}, model, tokenizer).params.logit_bias == {7: 1}
    assert chat({}, model, tokenizer).params.logit_bias == {}


def test_logprobs_edges(model, tokenizer) -> None:
    assert chat({"logprobs": True, "top_logprobs": 20}, model, tokenizer).params.logprobs == 20
    assert chat({"logprobs": True, "top_logprobs": 0}, model, tokenizer).params.logprobs == 0
    assert chat({"logprobs": False}, model, tokenizer).params.logprobs is None
    # completions: up to 20, as vLLM (its max_logprobs), not OpenAI's legacy 5
    assert comp({"logprobs": 20}, model, tokenizer).params.logprobs == 20
    assert comp({"logprobs": 0}, model, tokenizer).params.logprobs == 0


def test_tiny_temperature_is_greedy(model, tokenizer) -> None:
    assert chat({"temperature": 1e-9}, model, tokenizer).params.greedy  # dividing by it would overflow


# --- completions -------------------------------------------------------------------------------------


def comp(body: dict, model: ModelInfo, tok: FakeTokenizer):
    return parse_completion({"model": "test-model", "prompt": "ab", **body}, model, tok)


def test_completion_prompt_forms(model, tokenizer) -> None:
    ids = tokenizer.encode("ab")
    assert comp({}, model, tokenizer).prompt_token_ids == ids
    assert comp({"prompt": ["ab"]}, model, tokenizer).prompt_token_ids == ids
    assert comp({"prompt": [5, 6, 7]}, model, tokenizer).prompt_token_ids == [5, 6, 7]
    assert comp({"prompt": [[5, 6]]}, model, tokenizer).prompt_token_ids == [5, 6]
    p = comp({"echo": True, "max_tokens": 3}, model, tokenizer)
    assert (p.echo, p.params.max_tokens, p.kind) == ("ab", 3, "completion")
    assert comp({"prompt": [100, 101], "echo": True}, model, tokenizer).echo == tokenizer.decode([100, 101])
    assert comp({"logprobs": 3}, model, tokenizer).params.logprobs == 3
    assert comp({"best_of": 1}, model, tokenizer).params.n == 1


class NoBosTokenizer(FakeTokenizer):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().encode(text, add_special_tokens=False)


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ({"prompt": None}, 400, "prompt", None),
        ({"prompt": 5}, 400, "prompt", None),
        ({"prompt": []}, 400, "prompt", None),
        ({"prompt": ["a", "b"]}, 400, "prompt", None),  # batched
        ({"prompt": [[1], [2]]}, 400, "prompt", None),
        ({"prompt": ["a", 1]}, 400, "prompt", None),
        ({"prompt": [5, 999]}, 400, "prompt", None),  # not in the vocabulary
        ({"prompt": [5, -1]}, 400, "prompt", None),
        ({"prompt": [5, True]}, 400, "prompt", None),
        ({"echo": True, "logprobs": 1}, 400, "echo", "unsupported_parameter"),
        ({"echo": "yes"}, 400, "echo", "invalid_type"),
        ({"logprobs": 21}, 400, "logprobs", None),
        ({"logprobs": True}, 400, "logprobs", None),
        ({"suffix": "x"}, 400, "suffix", "unsupported_parameter"),
        ({"best_of": 3}, 400, "best_of", "unsupported_parameter"),
        ({"max_tokens": 300}, 400, "max_tokens", "context_length_exceeded"),
        ({"prompt": "x" * 300}, 400, "prompt", "context_length_exceeded"),
        ({"model": "nope"}, 404, "model", "model_not_found"),
    ],
)
def test_completion_errors(model, tokenizer, body, status, param, code) -> None:
    expect(lambda: comp(body, model, tokenizer), status, param, code)


def test_completion_empty_prompt(model) -> None:
    expect(lambda: comp({"prompt": ""}, model, NoBosTokenizer()), 400, "prompt")


# --- responses ---------------------------------------------------------------------------------------


def chunk(*outs: SeqOutput, finished: bool = False, cached: int = 0) -> StreamChunk:
    return StreamChunk("r", [o.__dict__ for o in outs], finished, 4, cached)


def test_collector_counts_usage_and_keeps_texts(tokenizer) -> None:
    col = R.Collector(2, prompt_tokens=4)
    col.add(chunk(SeqOutput(0, [10, 11], "ab"), SeqOutput(1, [12], "c"), cached=2))
    col.add(chunk(SeqOutput(0, [13], "d", "stop"), SeqOutput(1, [14], "e", "length"), SeqOutput(7, [1], "x")))
    assert [c.text for c in col.choices] == ["abd", "ce"]
    assert [c.finish_reason for c in col.choices] == ["stop", "length"]
    assert col.usage() == {
        "prompt_tokens": 4,
        "completion_tokens": 5,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    body = R.chat_response("id1", 1, "m", col, tokenizer)
    assert [c["message"] for c in body["choices"]] == [
        {"role": "assistant", "content": "abd"},
        {"role": "assistant", "content": "ce"},
    ]
    assert body["object"] == "chat.completion" and body["choices"][1]["index"] == 1
    body = R.completion_response("id2", 1, "m", col, tokenizer, echo="P:")
    assert [c["text"] for c in body["choices"]] == ["P:abd", "P:ce"] and body["object"] == "text_completion"


def test_logprobs_shapes(tokenizer) -> None:
    a, b = tokenizer.encode("a", False)[0], tokenizer.encode("b", False)[0]
    lps = [[-0.25, [[a, -0.25], [b, -2.0]]], [-math.inf, [[b, -1.0]]]]
    out = R.chat_logprobs(tokenizer, [a, b], lps)
    first = out["content"][0]
    assert first == {
        "token": "a",
        "logprob": -0.25,
        "bytes": [97],
        "top_logprobs": [
            {"token": "a", "logprob": -0.25, "bytes": [97]},
            {"token": "b", "logprob": -2.0, "bytes": [98]},
        ],
    }
    assert out["content"][1]["logprob"] == -9999.0  # -inf is not JSON
    assert R.chat_logprobs(tokenizer, [2], [[-1.0, []]])["content"][0]["token"] == "<s>"  # specials shown
    out = R.completion_logprobs(tokenizer, [a, b], lps, offset=3)
    assert out == {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.25, -9999.0],
        "top_logprobs": [{"a": -0.25, "b": -2.0}, {"b": -1.0}],
        "text_offset": [3, 4],
    }


def test_sse_and_chunks() -> None:
    assert R.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert R.SSE_DONE == b"data: [DONE]\n\n"
    c = R.chat_chunk("id", 1, "m", 0, {"content": "x"})
    assert "usage" not in c and c["choices"][0] == {
        "index": 0,
        "delta": {"content": "x"},
        "logprobs": None,
        "finish_reason": None,
    }
    assert R.chat_chunk("id", 1, "m", 0, {}, "stop", with_usage=True)["usage"] is None
    col = R.Collector(1, 3)
    u = R.usage_chunk("chat", "id", 1, "m", col)
    assert u["choices"] == [] and u["usage"]["total_tokens"] == 3 and u["object"] == "chat.completion.chunk"
    assert R.completion_chunk("id", 1, "m", 0, "t")["object"] == "text_completion"


def test_backend_errors_map_to_http() -> None:
    e = ApiError.from_wire({"message": "queues full", "type": "overloaded", "status": 429}, retry_after=2)
    assert (e.status, e.type, e.retry_after) == (429, "overloaded", 2)
    e = ApiError.from_wire({"message": "no instances", "type": "server_error", "status": 503}, retry_after=2)
    assert (e.status, e.retry_after) == (503, 2)
    e = ApiError.from_wire({"message": "bad", "status": 400, "param": "stop"}, retry_after=2)
    assert (e.status, e.type, e.param, e.retry_after) == (400, "invalid_request_error", "stop", None)
    assert ApiError.from_wire({}, 1).status == 502  # a malformed error says so
    assert ApiError(400, "m", param="p", code="c").body() == {
        "error": {"message": "m", "type": "invalid_request_error", "param": "p", "code": "c"}
    }
