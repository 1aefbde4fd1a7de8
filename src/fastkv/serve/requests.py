"""What a request may hold: OpenAI's fields, checked before any work, with an error that names the field.

A body is read with a size limit and parsed off the event loop; anything it cannot be (not UTF-8, not
JSON, nested too deep, a number too long, a string with an unpaired surrogate) is refused with 400. null
means the default, as in OpenAI's API. Fields OpenAI defines and this server does not implement are
refused by name (presence and frequency penalties and a logit bias only at their neutral values), never
silently ignored; `user` is accepted and logged.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RequestError(ValueError):
    """A request that cannot be served as written; `status`, `param` and `code` go into OpenAI's error JSON."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def checked_text(value: str, field: str) -> str:
    """A string that UTF-8 can encode (JSON's "\\ud800" decodes to an unpaired surrogate, which it cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field} holds an unpaired surrogate (\\ud800-\\udfff alone is not text)") from None
    return value


class Strict(BaseModel):
    # No field this server does not know, and no coercion: "yes" is not true and "3" is not 3.
    model_config = ConfigDict(extra="forbid", strict=True)


class FastKVOptions(Strict):
    method: str | None = Field(None, description="a method spec, e.g. fastkv(tsp_rate=0.2)")

    @field_validator("method")
    @classmethod
    def _text(cls, v):
        return checked_text(v, "fastkv.method") if v is not None else v


class StreamOptions(Strict):
    include_usage: bool | None = None


class Sampling(Strict):
    """The fields both endpoints take. None: not given (the default applies)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=1, description="one choice per request")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool | None = Field(None, description="generate max_tokens tokens whatever comes (as vLLM's)")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    fastkv: FastKVOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return v
        for s in [v] if isinstance(v, str) else v:
            checked_text(s, "stop")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v, info):
        if v not in (None, 0):
            raise ValueError(f"{info.field_name} is not supported by this server (only 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by this server (only an empty one)")
        return v

    @model_validator(mode="after")
    def _streaming(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options goes with stream: true")
        return self


class CompletionRequest(Sampling):
    prompt: str | list[int] = Field(..., min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        return checked_text(v, "prompt") if isinstance(v, str) else v


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, list):
            v = "".join(part.text for part in v)  # text parts are one text, in order
        return checked_text(v, "messages.content")


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


def decode_json(raw: bytes):
    """The JSON value of a body, or RequestError naming what it is not. Runs off the event loop."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the body is not UTF-8 (byte {e.start})", code="invalid_json") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError("the body's JSON is nested too deeply", code="invalid_json") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise RequestError(f"the body is not valid JSON ({where})", code="invalid_json") from None
    except ValueError:  # an integer of more digits than Python converts, or NaN / Infinity
        raise RequestError("the body holds a number this server does not read (too many digits, NaN or Infinity)",
                           code="invalid_json") from None  # fmt: skip


def _no_constant(name: str):
    raise ValueError(name)  # NaN, Infinity and -Infinity are not JSON


def parse_request(raw: bytes, kind: type[Sampling]) -> Sampling:
    """A checked request of `kind` from a body: RequestError names the first field that is wrong."""
    value = decode_json(raw)
    if not isinstance(value, dict):
        raise RequestError("the body must be a JSON object", code="invalid_json")
    try:
        return kind.model_validate(value)
    except ValidationError as e:
        first = e.errors(include_input=False, include_url=False)[0]
        param = ".".join(str(x) for x in first.get("loc", ()) if not isinstance(x, int)) or None
        if first.get("type") == "extra_forbidden":
            raise RequestError(f"{param} is not supported by this server", param, "unsupported_field") from None
        message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        raise RequestError(f"{param or 'body'}: {message}", param) from None
    except RecursionError:
        raise RequestError("the body is nested too deeply", code="invalid_json") from None
