"""The HTTP side: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health and /metrics.

Requests take OpenAI's fields (max_tokens, temperature, top_p, seed, stop, stream) and one extension,
`"fastkv": {"method": "<spec>"}` (the openai client sends it with `extra_body`). Responses carry `usage`,
`finish_reason` and, in the extension field `fastkv`, the request's stats: canonical method spec, where
FastKV's defaults came from, prefill seconds, KV bytes. Every refused request gets OpenAI's error JSON
with a 4xx status; the status follows the type of the error, never its text. Streams are server-sent
events in OpenAI's chunk format, ended by `data: [DONE]`; a client that goes away has its request
cancelled and its cache freed.

The steps are plain functions: `job_for` turns a request into a scheduler job, `response` and `chunk` turn
its result into OpenAI's JSON; `create_app` only wires them to routes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from ..chat import encode_rendered, has_template, render_chat
from ..engine import ContextLengthError
from ..methods import Method
from ..results import GenerationResult
from ..sampling import SamplingError, SamplingParams
from .metrics import Metrics
from .scheduler import Job, KVMemoryError, QueueFull, Scheduler

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


class FastKVOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str | None = Field(None, description="a method spec, e.g. fastkv(tsp_rate=0.2)")


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not use (user, logit_bias, ...) are ignored
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    ignore_eos: bool = Field(False, description="generate max_tokens tokens whatever comes (as vLLM's)")
    fastkv: FastKVOptions | None = None


class CompletionRequest(Sampling):
    prompt: str | list[int] = Field(..., min_length=1)


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(..., min_length=1)


@dataclass
class Served:
    """What the routes share: the model, its name, the scheduler, and the default method."""

    llm: object
    name: str
    scheduler: Scheduler
    metrics: Metrics
    default: tuple[Method, str]  # bound, and where FastKV's defaults came from


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


# -- request -> job --------------------------------------------------------------------------------------
def prompt_ids(served: Served, body: Sampling) -> list[int]:
    """The token ids of a request's prompt: a chat under the model's template, or a completion's text or ids."""
    llm = served.llm
    if isinstance(body, ChatRequest):
        if not has_template(llm.tokenizer):
            raise APIError(400, f"model {served.name!r} has no chat template: use /v1/completions", "messages")
        return encode_rendered(llm.tokenizer, render_chat(llm.tokenizer, [m.model_dump() for m in body.messages]))
    if isinstance(body.prompt, str):
        return llm.tokenizer(body.prompt)["input_ids"]
    vocab = llm.adapter.embed_tokens.num_embeddings
    if any(not 0 <= t < vocab for t in body.prompt):
        raise APIError(400, f"prompt: token ids must lie in 0..{vocab - 1}", "prompt")
    return list(body.prompt)


def sampling_of(served: Served, body: Sampling, prompt_len: int) -> SamplingParams:
    """The request's SamplingParams. Without max_tokens: the default (16 for completions, 256 for chat), as far
    as the context allows (at least 1, so that a prompt that fills the context is refused as too long)."""
    default = 256 if isinstance(body, ChatRequest) else 16
    max_tokens = body.max_tokens or max(1, min(default, served.llm.adapter.max_positions - prompt_len))
    try:
        return SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, body.stop or (), body.ignore_eos)
    except SamplingError as e:
        raise APIError(400, str(e), e.field, "invalid_value") from None


def job_for(served: Served, body: Sampling, loop: asyncio.AbstractEventLoop) -> tuple[Job, str]:
    """A request as a scheduler job, and where its FastKV defaults came from; APIError for what is wrong."""
    if body.model != served.name:
        raise APIError(404, f"model {body.model!r} is not served here; this server serves {served.name!r}", "model",
                       "model_not_found")  # fmt: skip
    spec = body.fastkv.method if body.fastkv and body.fastkv.method else None
    try:
        method, source = served.llm.resolve(spec) if spec else served.default
    except ValueError as e:
        raise APIError(400, str(e), "fastkv.method", "invalid_method") from None
    ids = prompt_ids(served, body)
    params = sampling_of(served, body, len(ids))
    where = "messages" if isinstance(body, ChatRequest) else "prompt"
    try:
        return served.scheduler.make_job(ids, method, params, loop), source
    except ContextLengthError as e:
        raise APIError(400, str(e), where, "context_length_exceeded") from None
    except KVMemoryError as e:
        raise APIError(400, str(e), where, "kv_memory_exceeded") from None


# -- result -> response ------------------------------------------------------------------------------------
def response(served: Served, rid: str, created: int, chat: bool, result: GenerationResult, source: str) -> dict:
    choice: dict = {"index": 0, "finish_reason": FINISH[result.finish_reason], "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": result.text}
    else:
        choice["text"] = result.text
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": served.name,
        "choices": [choice],
        "usage": usage(result),
        "fastkv": stats(result, source),
    }


def chunk(served: Served, rid: str, created: int, chat: bool, piece: str | None, finish: str | None = None,
          **extra) -> str:  # fmt: skip
    """One server-sent event of a stream; piece None opens a chat stream (its role) or closes a completion's."""
    if chat:
        delta = {"role": "assistant", "content": ""} if piece is None else {"content": piece}
        choice = {"index": 0, "delta": delta if finish is None else {}, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
    kind = "chat.completion.chunk" if chat else "text_completion"
    body = {"id": rid, "object": kind, "created": created, "model": served.name, "choices": [choice], **extra}
    return f"data: {json.dumps(body)}\n\n"


def usage(result: GenerationResult) -> dict:
    s = result.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
            "total_tokens": s.prompt_tokens + s.new_tokens}  # fmt: skip


def stats(result: GenerationResult, source: str) -> dict:
    s = result.stats
    return {
        "method": s.method,
        "defaults": source or None,
        "prefill_seconds": round(s.prefill_seconds, 4),
        "decode_seconds": round(s.decode_seconds, 4),
        "kv_bytes": s.kv_bytes,
        "kv_bytes_full": s.kv_bytes_full,
        "prefix_tokens_reused": s.prefix_tokens_reused,
    }


async def collect(scheduler: Scheduler, request: Request, job: Job) -> GenerationResult:
    """Wait for the job's result, cancelling it if the client goes away meanwhile."""
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except (TimeoutError, asyncio.TimeoutError):  # the same class from Python 3.11 on
                if await request.is_disconnected():
                    raise APIError(499, "the client went away", code="client_closed") from None
                continue
            if kind == "done":
                return value
            if kind == "error":
                raise APIError(503, value, code="engine_error")
    finally:
        scheduler.cancel(job)  # a no-op once it is done


async def events(served: Served, job: Job, rid: str, created: int, chat: bool, source: str):
    """A job's stream of server-sent events."""
    try:
        if chat:
            yield chunk(served, rid, created, chat, None)
        while True:
            event, value = await job.events.get()
            if event == "text":
                yield chunk(served, rid, created, chat, value)
            elif event == "done":
                yield chunk(served, rid, created, chat, None if chat else "", FINISH[value.finish_reason],
                            usage=usage(value), fastkv=stats(value, source))  # fmt: skip
                break
            else:
                yield f"data: {json.dumps(error_body(APIError(503, value, code='engine_error')))}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the generator is closed) or the stream ended: free the job
        served.scheduler.cancel(job)


async def answer(served: Served, request: Request, body: Sampling):
    job, source = job_for(served, body, asyncio.get_running_loop())
    try:
        served.scheduler.submit(job)
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e}; retry later", code="server_busy",
                       kind="rate_limit_error") from None  # fmt: skip
    chat = isinstance(body, ChatRequest)
    rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{job.id}", int(time.time())
    if body.stream:
        served.metrics.requests.labels("200").inc()
        return StreamingResponse(events(served, job, rid, created, chat, source), media_type="text/event-stream")
    result = await collect(served.scheduler, request, job)
    served.metrics.requests.labels("200").inc()
    return response(served, rid, created, chat, result, source)


# -- the app ---------------------------------------------------------------------------------------------
def create_app(llm, name: str, method: str, kv_mib: float, max_batch: int = 16, max_queue: int = 64,
               compile: bool = False, replica: str | None = None,
               metrics_body: Callable[[], Awaitable[bytes]] | None = None,
               prefix_cache_mib: float | None = None) -> FastAPI:  # fmt: skip
    """The app serving `llm` as model `name`, with `method` as the default spec.

    replica: this server's name among replicas (Ray Serve), shown by /health; metrics_body: what /metrics
    answers instead of this server's own registry (Ray Serve: every replica's, labelled by replica).
    prefix_cache_mib: the prefix store's bound (0: none; None: the llm's own store, if it has one).
    """
    if prefix_cache_mib is not None:
        llm.use_prefix_cache(prefix_cache_mib)
    metrics = Metrics()
    scheduler = Scheduler(llm, int(kv_mib * 2**20), max_batch, max_queue, metrics, compile=compile)
    served = Served(llm, name, scheduler, metrics, llm.resolve(method))  # a bad default fails here, at start

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="fastkv", lifespan=lifespan)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        metrics.requests.labels(str(e.status)).inc()
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(error_body(e), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            error = APIError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
        else:
            param = ".".join(where) or None
            error = APIError(400, f"{param or 'body'}: {first.get('msg')}", param=param, code="invalid_value")
        return await api_error(request, error)

    @app.get("/health")
    async def health():
        found = {"status": "ok", "model": name, "running": len(scheduler.jobs), "queued": len(scheduler.queue)}
        return found if replica is None else {**found, "replica": replica}

    @app.get("/metrics")
    async def prometheus():
        body = await metrics_body() if metrics_body else generate_latest(metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "fastkv"}]}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await answer(served, request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await answer(served, request, body)

    return app
