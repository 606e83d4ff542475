"""The OpenAI API's request bodies, checked field by field, and its error object.

Only what tformer can honour is accepted: a field it does not know, or a known one it cannot
honour (`logprobs`, penalties, `n` > 1, tools), is a 400 naming the field, never silently ignored.
Every error is OpenAI's object, `{"error": {"message", "type", "param", "code"}}`, so that clients
written for OpenAI or vLLM report it as they would theirs.

Chat has no template of its own in the model (the tutorial model has no chat training): messages
become one prompt, `"{role}: {content}\\n"` per message, then `"assistant:"`, and the completion of
that prompt is the assistant's reply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tformer.engine import SamplingParams
from tformer.errors import TformerError
from tformer.inputs import as_stop

# Fields OpenAI defines that tformer cannot honour: accepted only at their "off" value.
NEUTRAL = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "best_of": (None, 1), "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None,),
    "tools": (None,), "tool_choice": (None, "none"), "response_format": (None,), "parallel_tool_calls": (None,),
}  # fmt: skip
DEFAULT = SamplingParams()  # what a request that leaves a sampling field out gets: the same as in Python

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n",
          "ignore_eos", "user"}  # fmt: skip
COMPLETION_FIELDS = COMMON | {"prompt", "echo"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}
CHAT_ROLES = ("system", "user", "assistant", "developer")


class APIError(Exception):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """A checked request: prompts as text or ids (one choice each), how to sample, how to answer."""

    texts: list[str] | None  # the prompts as text, when they came as text
    ids: list[list[int]] | None  # the prompts as token ids, when they came as ids
    params: SamplingParams  # its `stop` strings too
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    ignore_eos: bool = False


def check_completion(body: Any, model_name: str) -> Job:
    """A `/v1/completions` body as a `Job`."""
    body = _object(body, COMPLETION_FIELDS)
    _model(body, model_name)
    texts, ids = _prompt(body.get("prompt"))
    return _job(body, texts, ids, max_tokens=body.get("max_tokens", 16), echo=_bool(body, "echo"))


def check_chat(body: Any, model_name: str) -> Job:
    """A `/v1/chat/completions` body as a `Job` whose one prompt is the messages, templated."""
    body = _object(body, CHAT_FIELDS)
    _model(body, model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    lines = [f"{_role(m, i)}: {_content(m, i)}\n" for i, m in enumerate(messages)]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
    return _job(body, ["".join(lines) + "assistant:"], None, max_tokens=max_tokens, echo=False)


def _job(body: dict, texts, ids, max_tokens, echo: bool) -> Job:
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise APIError(400, f"'n' must be 1 (one completion per prompt), got {n!r}", "n")
    top_k = body.get("top_k")
    params = SamplingParams(
        max_new_tokens=_int(max_tokens, "max_tokens", 1),
        temperature=_number(body, "temperature", DEFAULT.temperature, 0.0, 2.0),
        top_k=DEFAULT.top_k if top_k in (None, -1) else _int(top_k, "top_k", 1),
        top_p=_number(body, "top_p", DEFAULT.top_p or 1.0, 0.0, 1.0, low_open=True),
        seed=None if body.get("seed") is None else _int(body["seed"], "seed", 0, 2**64 - 1),
        stop=_stop(body.get("stop")),
    )
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise APIError(400, "'stream_options' takes only {\"include_usage\": true|false}", "stream_options")
    include_usage = bool(options and _bool(options, "include_usage"))
    return Job(texts, ids, params, _bool(body, "stream"), include_usage, echo, _bool(body, "ignore_eos"))


def _object(body: Any, known: set[str]) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in body:
        if name in NEUTRAL:
            value = body[name]
            if not any(value is off or (type(value) is type(off) and value == off) for off in NEUTRAL[name]):
                raise APIError(400, f"'{name}' is not supported by tformer (leave it out)", name, "unsupported_parameter")
        elif name not in known:
            raise APIError(400, f"unknown field '{name}'", name, "unknown_parameter")
    return body


def _model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "'model' is required: a string (see GET /v1/models)", "model")
    if model != model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{model_name}'", "model",
                       "model_not_found")  # fmt: skip


def _prompt(prompt: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    what = "'prompt' must be a string, a list of strings, a list of token ids, or a list of such lists"
    if isinstance(prompt, str):
        return [prompt], None
    if not isinstance(prompt, list) or not prompt:
        raise APIError(400, what, "prompt")
    if all(isinstance(p, str) for p in prompt):
        return prompt, None
    if all(_is_id(t) for t in prompt):
        return None, [prompt]
    if all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in prompt):
        return None, prompt
    raise APIError(400, what, "prompt")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _role(message: Any, i: int) -> str:
    if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
        raise APIError(400, f"messages[{i}] needs a 'role', one of {', '.join(CHAT_ROLES)}", f"messages[{i}].role")
    return message["role"]


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text ones
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    elif isinstance(content, str):
        return content
    raise APIError(400, f"messages[{i}].content must be a string (or text parts)", f"messages[{i}].content")


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", "stop")
    try:
        return as_stop(stops)  # what SamplingParams checks: a lone surrogate (JSON's "\udfff") is no text
    except TformerError as exc:
        raise APIError(400, f"'stop': {exc}", "stop") from None


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false, got {value!r}", name)
    return value


def _int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if not _is_id(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise APIError(400, f"'{name}' must be an integer {bound}, got {value!r}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"'{name}' must be a number in {interval}, got {value!r}", name)
    return float(value)
