"""The HTTP side: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health and /metrics.

Requests take OpenAI's fields (`requests.py`: null means the default; a field this server does not
implement is refused by name) and one extension, `"fastkv": {"method": "<spec>"}` (the openai client sends
it with `extra_body`). Responses carry `usage`, `finish_reason`, `logprobs` when asked for and, in the
extension field `fastkv`, the request's stats: canonical method spec, where FastKV's defaults came from,
prefill seconds, KV bytes, prompt tokens reused from the prefix store. Streams are server-sent events in
OpenAI's chunk format, ended by `data: [DONE]`, each chunk with the logprobs of the tokens it reports
when asked for (a token whose text is not final yet still gets its chunk); a client that goes away has its
request cancelled.

Every error, whatever raised it (a route that does not exist, a body that is not JSON, a bad field, the
engine), is OpenAI's error JSON with a 4xx or 5xx status chosen by the error's type, never by its text;
no exception text or traceback reaches a client: details go to the log under the request's id, which
the client gets too (`x-request-id`). Ids are random (`req-` and a uuid4's 32 hex digits), unique across
restarts and replicas; a response's id (`chatcmpl-`/`cmpl-`) has its request id's digits, so either finds
the request's log lines. The log ("fastkv.serve") has one line at startup naming what is served and
within which bounds, and one line per request as it ends (done, refused, failed or cancelled). Bodies
are read with a size limit and parsed, tokenized and templated off the event loop, so /health answers
while a large request is refused or a long prompt prefills.

The steps are plain functions: `job_for` turns a request into a scheduler job, `response` and `chunk` turn
its result into OpenAI's JSON; `create_app` only wires them to routes.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..chat import encode_rendered, has_template, render_chat
from ..engine import ContextLengthError
from ..methods import Method, format_spec
from ..results import GenerationResult
from ..sampling import SamplingError, SamplingParams
from .metrics import Metrics
from .requests import ChatRequest, CompletionRequest, RequestError, Sampling, parse_request
from .scheduler import EngineDown, Job, KVMemoryError, QueueFull, Scheduler

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
log = logging.getLogger("fastkv.serve")


DEFAULT_CODES = {400: "invalid_value", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
                 413: "body_too_large", 429: "server_busy", 499: "client_closed"}  # fmt: skip


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or DEFAULT_CODES.get(status, "server_error")
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


@dataclass(frozen=True)
class ServeLimits:
    """What a client may ask of the server, checked before any work."""

    max_body_bytes: int = 8 * 2**20
    max_prompt_tokens: int | None = None  # None: as many as the model's context takes
    api_key: str | None = None  # requests need "Authorization: Bearer <key>" (all but /health)
    allowed_hosts: frozenset[str] | None = None  # Host headers accepted (None: any); loopback binds get LOOPBACK


@dataclass
class Served:
    """What the routes share: the model, its name, the scheduler, the default method and the limits."""

    llm: object
    name: str
    scheduler: Scheduler
    metrics: Metrics
    default: tuple[Method, str]  # bound, and where FastKV's defaults came from
    limits: ServeLimits = field(default_factory=ServeLimits)


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


def request_id() -> str:
    """A new request's id. Random rather than counted: clients and log searches use ids as keys, and a count
    starts again at every restart and in every replica."""
    return f"req-{uuid.uuid4().hex}"


def response_id(rid: str, chat: bool) -> str:
    """OpenAI's id of the response to request `rid`: the same digits, so that the id a client keeps finds
    the server's log lines about it (they name `rid`)."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{rid.removeprefix('req-')}"


# -- the log ---------------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / 2**20:.1f}".removesuffix(".0")


def log_startup(served: Served, replica: str | None = None) -> None:
    """One line naming what this server serves and within which bounds, so that an operator can check a
    deployment from its log (no paths: where the defaults came from is the profile's name and date)."""
    llm, scheduler, method, source = served.llm, served.scheduler, *served.default
    context = llm.adapter.max_positions
    most = min(served.limits.max_prompt_tokens or context, context)
    store = llm.prefix_cache
    store_bytes = min(store.max_bytes, scheduler.kv_limit) if store is not None else 0
    log.info("serving model=%r method=%r fastkv_defaults=%s precision=%s kv_mib=%s prefix_store_mib=%s "
             "max_batch=%d max_queue=%d max_prompt_tokens=%d prefill_chunk=%s%s",
             served.name, format_spec(method), repr(source) if source else "none", llm.precision,
             mib(scheduler.kv_limit), mib(store_bytes), scheduler.max_batch, scheduler.max_queue, most,
             scheduler.prefill_chunk or "whole", f" replica={replica}" if replica else "")  # fmt: skip


def log_done(rid: str, result: GenerationResult) -> None:
    """The line of a request answered in full (streamed or not)."""
    s = result.stats
    rate = s.decode_tokens_per_s
    log.info("%s done: finish=%s prompt_tokens=%d prefix_reused=%d prefill_s=%.3f new_tokens=%d decode_tok_s=%s",
             rid, FINISH[result.finish_reason], s.prompt_tokens, s.prefix_tokens_reused, s.prefill_seconds,
             s.new_tokens, f"{rate:.1f}" if math.isfinite(rate) else "-")  # fmt: skip


def log_ended(rid: str, e: APIError) -> None:
    """The line of a request that ended without its answer: refused (4xx), cancelled (its client went
    away) or failed (5xx; the error's details were logged where it was raised). The client's own text (a
    field's name) is quoted and cut short, so that a request cannot forge or flood log lines."""
    what = "cancelled" if e.status == 499 else "failed" if e.status >= 500 else "refused"
    param = f" param={e.param[:100]!r}" if e.param else ""
    log.log(logging.WARNING if e.status >= 500 else logging.INFO, "%s %s: status=%d code=%s%s", rid, what,
            e.status, e.code, param)  # fmt: skip


# -- request -> job --------------------------------------------------------------------------------------
def prompt_ids(served: Served, body: Sampling) -> list[int]:
    """The token ids of a request's prompt: a chat under the model's template, or a completion's text or ids."""
    llm = served.llm
    if isinstance(body, ChatRequest):
        if not has_template(llm.tokenizer):
            raise APIError(400, f"model {served.name!r} has no chat template: use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        return encode_rendered(llm.tokenizer, render_chat(llm.tokenizer, messages))
    if isinstance(body.prompt, str):
        return llm.tokenizer(body.prompt)["input_ids"]
    vocab = llm.adapter.embed_tokens.num_embeddings
    if any(not 0 <= t < vocab for t in body.prompt):
        raise APIError(400, f"prompt: token ids must lie in 0..{vocab - 1}", "prompt")
    return list(body.prompt)


def requested_logprobs(body: Sampling) -> int | None:
    if isinstance(body, ChatRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def sampling_of(served: Served, body: Sampling, prompt_len: int) -> SamplingParams:
    """The request's SamplingParams; null fields take OpenAI's defaults (temperature 1, top_p 1). Without a
    token limit: 16 for completions, 256 for chat, as far as the context allows (at least 1, so that a prompt
    that fills the context is refused as too long)."""
    chat = isinstance(body, ChatRequest)
    limit = (body.max_completion_tokens if chat else None) or body.max_tokens
    room = served.llm.adapter.max_positions - prompt_len
    logprobs = requested_logprobs(body)
    try:
        return SamplingParams(
            max_tokens=limit or max(1, min(256 if chat else 16, room)),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stop or (),
            ignore_eos=bool(body.ignore_eos),
            logprobs=logprobs,
        )
    except SamplingError as e:
        raise APIError(400, str(e), e.field, "invalid_value") from None


def job_for(served: Served, body: Sampling, loop: asyncio.AbstractEventLoop, rid: str) -> tuple[Job, str]:
    """A request as a scheduler job, and where its FastKV defaults came from; APIError for what is wrong.
    Tokenizes and templates: run it off the event loop."""
    if body.model != served.name:
        raise APIError(404, f"model {body.model!r} is not served here; this server serves {served.name!r}", "model",
                       "model_not_found")  # fmt: skip
    spec = body.fastkv.method if body.fastkv and body.fastkv.method else None
    try:
        method, source = served.llm.resolve(spec) if spec else served.default
    except ValueError as e:
        raise APIError(400, str(e), "fastkv.method", "invalid_method") from None
    ids = prompt_ids(served, body)
    where = "messages" if isinstance(body, ChatRequest) else "prompt"
    most = served.limits.max_prompt_tokens
    if most is not None and len(ids) > most:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this server takes at most {most}", where,
                       "context_length_exceeded")  # fmt: skip
    params = sampling_of(served, body, len(ids))
    try:
        job = served.scheduler.make_job(ids, method, params, loop)
    except ContextLengthError as e:
        raise APIError(400, str(e), where, "context_length_exceeded") from None
    except KVMemoryError as e:
        raise APIError(400, str(e), where, "kv_memory_exceeded") from None
    job.rid = rid
    if body.user:
        log.info("%s from user %r", rid, body.user[:100])
    return job, source


# -- result -> response ------------------------------------------------------------------------------------
def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def logprobs_json(served: Served, found: list | None, chat: bool, offset: int = 0) -> dict | None:
    """OpenAI's logprobs of generated tokens (`TokenLogprob`s): chat's `content` list, or completions'
    parallel lists with text offsets counted from `offset` (a stream's text so far)."""
    if found is None:
        return None
    tok = served.llm.tokenizer
    if chat:

        def entry(token: int, logprob: float) -> dict:
            text = token_text(tok, token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                   for t in found]  # fmt: skip
        return {"content": content}
    tokens = [token_text(tok, t.token) for t in found]
    offsets = list(itertools.accumulate([offset, *map(len, tokens)]))[:-1]
    return {
        "tokens": tokens,
        "token_logprobs": [t.logprob for t in found],
        "top_logprobs": [{token_text(tok, i): lp for i, lp in t.top} for t in found],
        "text_offset": offsets,
    }


def response(served: Served, rid: str, created: int, chat: bool, result: GenerationResult, source: str) -> dict:
    choice: dict = {"index": 0, "finish_reason": FINISH[result.finish_reason],
                    "logprobs": logprobs_json(served, result.logprobs, chat)}  # fmt: skip
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
          logprobs: dict | None = None, **extra) -> str:  # fmt: skip
    """One server-sent event of a stream; piece None opens a chat stream (its role) or closes a completion's.
    logprobs: those of the tokens this chunk reports (`logprobs_json`)."""
    if chat:
        delta = {"role": "assistant", "content": ""} if piece is None else {"content": piece}
        choice = {"index": 0, "delta": delta if finish is None else {}, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = logprobs
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": logprobs}
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
        "kv_bytes_end": s.kv_bytes_end,
        "kv_evicted": s.kv_evicted,
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


async def events(served: Served, job: Job, rid: str, created: int, chat: bool, source: str, with_usage: bool):
    """A job's stream of server-sent events (rid: the response's id); with_usage (stream_options.include_usage):
    every chunk carries "usage": null and a last chunk, with no choices, the usage."""
    extra = {"usage": None} if with_usage else {}
    sent = 0  # characters of text streamed so far: completions' text offsets count from it
    ended = False
    try:
        if chat:
            yield chunk(served, rid, created, chat, None, **extra)
        while True:
            event, value = await job.events.get()
            if event == "text":
                piece, found = value
                logprobs = logprobs_json(served, found, chat, sent)
                sent += len(piece)
                yield chunk(served, rid, created, chat, piece, logprobs=logprobs, **extra)
            elif event == "done":
                ended = True
                log_done(job.request_id, value)
                yield chunk(served, rid, created, chat, None if chat else "", FINISH[value.finish_reason],
                            fastkv=stats(value, source), **(extra or {"usage": usage(value)}))  # fmt: skip
                if with_usage:
                    kind = "chat.completion.chunk" if chat else "text_completion"
                    last = {"id": rid, "object": kind, "created": created, "model": served.name, "choices": [],
                            "usage": usage(value)}  # fmt: skip
                    yield f"data: {json.dumps(last)}\n\n"
                break
            else:
                ended = True
                failure = APIError(503, value, code="engine_error")
                log_ended(job.request_id, failure)
                yield f"data: {json.dumps(error_body(failure))}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the generator is closed) or the stream ended: free the job
        served.scheduler.cancel(job)
        if not ended:
            log_ended(job.request_id, APIError(499, "the client went away", code="client_closed"))


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 as soon as it is larger than `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise APIError(413, f"the body is larger than this server takes ({limit} bytes)", code="body_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the body is larger than this server takes ({limit} bytes)", code="body_too_large")
    return bytes(body)


async def answer(served: Served, request: Request, kind: type[Sampling]):
    rid = request.state.rid
    raw = await read_body(request, served.limits.max_body_bytes)
    try:
        body = await asyncio.to_thread(parse_request, raw, kind)
    except RequestError as e:
        raise APIError(e.status, e.message, e.param, e.code) from None
    job, source = await asyncio.to_thread(job_for, served, body, asyncio.get_running_loop(), rid)
    try:
        served.scheduler.submit(job)
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e}; retry later", code="server_busy",
                       kind="rate_limit_error") from None  # fmt: skip
    except EngineDown as e:
        raise APIError(503, str(e), code="engine_unavailable") from None
    chat = kind is ChatRequest
    oid, created = response_id(rid, chat), int(time.time())
    if body.stream:
        served.metrics.requests.labels("200").inc()
        with_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = events(served, job, oid, created, chat, source, with_usage)
        return StreamingResponse(stream, media_type="text/event-stream")
    result = await collect(served.scheduler, request, job)
    served.metrics.requests.labels("200").inc()
    log_done(rid, result)
    return response(served, oid, created, chat, result, source)


# -- access ----------------------------------------------------------------------------------------------
class Guard:
    """ASGI middleware: a request id for every request (and its `x-request-id` header), the Host allowlist
    (a web page cannot reach a loopback server through DNS rebinding) and the API key."""

    def __init__(self, app, limits: ServeLimits, metrics: Metrics) -> None:
        self.app, self.limits, self.metrics = app, limits, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id()
        scope.setdefault("state", {})["rid"] = rid
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refused = self.refusal(scope["path"], headers)
        if refused is not None:
            self.metrics.requests.labels(str(refused.status)).inc()
            log_ended(rid, refused)
            body = json.dumps(error_body(refused)).encode()
            extra = [(b"www-authenticate", b"Bearer")] if refused.status == 401 else []
            await send({"type": "http.response.start", "status": refused.status,
                        "headers": [(b"content-type", b"application/json"), (b"x-request-id", rid.encode()),
                                    *extra]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return None

        async def with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        return await self.app(scope, receive, with_id)

    def refusal(self, path: str, headers: dict[str, str]) -> APIError | None:
        allowed = self.limits.allowed_hosts
        if allowed is not None:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
            if name.lower() not in allowed:
                message = f"Host {host[:100]!r} is not allowed here (--allowed-host)"
                return APIError(403, message, code="host_not_allowed", kind="permission_error")
        key = self.limits.api_key
        if key is not None and path != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return APIError(401, "a valid API key is needed: Authorization: Bearer <key>", code="invalid_api_key",
                                kind="authentication_error")  # fmt: skip
        return None


# -- the app ---------------------------------------------------------------------------------------------
def create_app(llm, name: str, method: str, kv_mib: float, max_batch: int = 16, max_queue: int = 64,
               compile: bool = False, replica: str | None = None,
               metrics_body: Callable[[], Awaitable[bytes]] | None = None,
               prefix_cache_mib: float | None = None, limits: ServeLimits | None = None,
               shutdown_timeout: float = 30.0, prefill_chunk: int | None = 256,
               prefill_budget: int = 8192, prefill_share: float = 1.0) -> FastAPI:  # fmt: skip
    """The app serving `llm` as model `name`, with `method` as the default spec.

    replica: this server's name among replicas (Ray Serve), shown by /health; metrics_body: what /metrics
    answers instead of this server's own registry (Ray Serve: every replica's, labelled by replica).
    prefix_cache_mib: the prefix store's bound (0: none; None: the llm's own store, if it has one).
    shutdown_timeout: at shutdown, running requests get this long to finish; the rest end with an error.
    prefill_chunk, prefill_budget, prefill_share: prefills go this many tokens at a time, with a decode step of
    the running batch after every prefill_budget tokens of prefill work or prefill_share decode steps' time of
    it, whichever comes first (`Scheduler`); prefill_chunk None: whole prefills.
    """
    if prefix_cache_mib is not None:
        llm.use_prefix_cache(prefix_cache_mib)
    metrics = Metrics()
    scheduler = Scheduler(llm, int(kv_mib * 2**20), max_batch, max_queue, metrics, compile, prefill_chunk,
                          prefill_budget, prefill_share)  # fmt: skip
    limits = limits or ServeLimits()
    served = Served(llm, name, scheduler, metrics, llm.resolve(method), limits)  # a bad default fails here

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        log_startup(served, replica)
        yield
        await asyncio.to_thread(scheduler.stop, shutdown_timeout)

    app = FastAPI(title="fastkv", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.metrics, app.state.served = scheduler, metrics, served

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        metrics.requests.labels(str(e.status)).inc()
        log_ended(getattr(request.state, "rid", "?"), e)
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(error_body(e), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        what = {404: "there is no such route", 405: "this route does not take that method"}
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return await api_error(request, APIError(e.status_code, what.get(e.status_code, "refused"), code=code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        rid = getattr(request.state, "rid", "?")
        log.error("%s failed: %s: %s", rid, type(e).__name__, e, exc_info=e)
        message = f"the server failed on this request ({rid}; its log has the details)"
        return await api_error(request, APIError(500, message, code="internal_error"))

    @app.get("/health")
    async def health():
        if scheduler.dead is not None:
            return JSONResponse({"status": "dead", "model": name, "reason": scheduler.dead}, status_code=503)
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
    async def completions(request: Request):
        return await answer(served, request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(served, request, ChatRequest)

    app.add_middleware(Guard, limits=limits, metrics=metrics)
    return app
