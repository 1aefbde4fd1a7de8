"""The HTTP side: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health and /metrics.

Requests take OpenAI's fields (max_tokens, temperature, top_p, seed, stop, stream) and one extension,
`"fastkv": {"method": "<spec>"}` (the openai client sends it with `extra_body`). Responses carry `usage`,
`finish_reason` and, in the extension field `fastkv`, the request's stats: canonical method spec, where
FastKV's defaults came from, prefill seconds, KV bytes. Every refused request gets OpenAI's error JSON
with a 4xx status. Streams are server-sent events in OpenAI's chunk format, ended by `data: [DONE]`; a
client that goes away has its request cancelled and its cache freed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from ..generate import GenerationResult
from .metrics import Metrics
from .scheduler import Job, QueueFull, Scheduler

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


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


def create_app(llm, name: str, method: str, kv_mib: float, max_batch: int = 16, max_queue: int = 64,
               compile: bool = False, replica: str | None = None,
               metrics_body: Callable[[], Awaitable[bytes]] | None = None) -> FastAPI:  # fmt: skip
    """The app serving `llm` as model `name`, with `method` as the default spec.

    replica: this server's name among replicas (Ray Serve), shown by /health; metrics_body: what /metrics
    answers instead of this server's own registry (Ray Serve: every replica's, labelled by replica).
    """
    metrics = Metrics()
    scheduler = Scheduler(llm, int(kv_mib * 2**20), max_batch, max_queue, metrics, compile=compile)
    default_method = resolve(llm, method)  # a bad default fails here, at start

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

    def prepare(body: Sampling, ids: list[int], default_tokens: int) -> tuple[Job, str]:
        if body.model != name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves {name!r}", "model",
                           "model_not_found")  # fmt: skip
        spec = body.fastkv.method if body.fastkv and body.fastkv.method else None
        try:
            chosen, source = resolve(llm, spec) if spec else default_method
        except ValueError as e:
            raise APIError(400, str(e), "fastkv.method", "invalid_method") from None
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        # without max_tokens: the default, as far as the context allows (at least 1, so that a prompt that
        # fills the context is refused as too long, not for its max_tokens)
        max_tokens = body.max_tokens or max(1, min(default_tokens, llm.parts.max_positions - len(ids)))
        try:
            job = scheduler.make_job(ids, chosen, max_tokens, body.temperature, body.top_p, body.seed, stop,
                                     asyncio.get_running_loop(), body.ignore_eos)  # fmt: skip
        except ValueError as e:
            code = "context_length_exceeded" if "exceeds the model's context" in str(e) else "invalid_value"
            raise APIError(400, str(e), "messages" if isinstance(body, ChatRequest) else "prompt", code) from None
        return job, source

    async def answer(request: Request, body: Sampling, ids: list[int], chat: bool):
        job, source = prepare(body, ids, 256 if chat else 16)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", code="server_busy",
                           kind="rate_limit_error") from None  # fmt: skip
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{job.id}", int(time.time())
        if body.stream:
            metrics.requests.labels("200").inc()
            chunks = stream(job, rid, created, chat, source)
            return StreamingResponse(chunks, media_type="text/event-stream")
        result = await collect(request, job)
        metrics.requests.labels("200").inc()
        return complete(rid, created, chat, result, source)

    def complete(rid: str, created: int, chat: bool, result: GenerationResult, source: str) -> dict:
        choice: dict = {"index": 0, "finish_reason": FINISH[result.finish_reason], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": name,
            "choices": [choice],
            "usage": usage(result),
            "fastkv": stats(result, source),
        }

    async def collect(request: Request, job: Job) -> GenerationResult:
        """Wait for the job's result, cancelling it if the client goes away meanwhile."""
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise APIError(499, "the client went away", code="client_closed") from None
                    continue
                if kind == "done":
                    return value
                if kind == "error":
                    raise APIError(503, value, code="engine_error")
        finally:
            scheduler.cancel(job)  # a no-op once it is done

    async def stream(job: Job, rid: str, created: int, chat: bool, source: str):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, finish: str | None = None, **extra) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if piece is None else {"content": piece}
                choice = {"index": 0, "delta": delta if finish is None else {}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": kind, "created": created, "model": name, "choices": [choice], **extra}
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk(None)
            while True:
                event, value = await job.events.get()
                if event == "text":
                    yield chunk(value)
                elif event == "done":
                    yield chunk(None if chat else "", FINISH[value.finish_reason], usage=usage(value),
                                fastkv=stats(value, source))  # fmt: skip
                    break
                else:
                    yield f"data: {json.dumps(error_body(APIError(503, value, code='engine_error')))}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the generator is closed) or the stream ended: free the job
            scheduler.cancel(job)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        prompt = body.prompt
        ids = list(prompt) if isinstance(prompt, list) else llm.tokenizer(prompt)["input_ids"]
        vocab = llm.parts.embed_tokens.num_embeddings
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt: token ids must lie in 0..{vocab - 1}", "prompt")
        return await answer(request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        if not getattr(llm.tokenizer, "chat_template", None):
            raise APIError(400, f"model {name!r} has no chat template: use /v1/completions", "messages")
        messages = [m.model_dump() for m in body.messages]
        text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
        return await answer(request, body, ids, chat=True)

    return app


def resolve(llm, spec: str | None):
    """(bound method, where FastKV's defaults came from) for a spec: ValueError if it is bad."""
    chosen, source = llm.method(spec)
    return chosen.bind(llm.parts.num_layers), source


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
    }
