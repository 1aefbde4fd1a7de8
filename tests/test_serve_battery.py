"""A battery of malformed, hostile and edge-case requests against a live `fastkv serve` (127.0.0.1, a tiny model),
as an outside client sends them: plain HTTP, raw sockets and the openai client. None may get a 500, hang, or
see a traceback or an exception's text; every refusal is OpenAI's error JSON naming the problem; afterwards
a greedy request answers as it did before and nothing is left running or queued."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from fastkv import LLM  # noqa: E402
from fastkv.serve.api import ServeLimits  # noqa: E402
from fastkv.serve.http import Connections  # noqa: E402
from fastkv.serve.thread import ServerThread  # noqa: E402

BODY_LIMIT = 64 * 1024
OK = {"model": "tiny", "prompt": "Hello there, how are", "max_tokens": 3, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 3, "temperature": 0}
LEAKS = ("Traceback", 'File "', "Error:", "Exception", "\\n  File")


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM.load(str(tiny_dir), dtype="float32", progress=False)


@pytest.fixture(scope="module")
def server(llm):
    live = ServerThread(llm, "tiny", "snapkv(budget=64)", Connections(header_timeout=1.0, keep_alive=2.0),
                        kv_mib=64, max_batch=2, max_queue=4, prefix_cache_mib=8, prefill_chunk=64, prefill_budget=128,
                        limits=ServeLimits(max_body_bytes=BODY_LIMIT, max_prompt_tokens=700))  # fmt: skip
    yield live
    live.close()


def with_(base: dict, **changes) -> dict:
    return {**base, **changes}


def raw(body: str | bytes) -> bytes:
    return body if isinstance(body, bytes) else body.encode()


# (class, path, body (dict: JSON, str/bytes: sent as is), statuses it may get)
# fmt: off
CASES = [
    ("bad JSON", "/v1/completions", "not json", {400}),
    ("bad JSON", "/v1/completions", "{", {400}),
    ("bad JSON", "/v1/completions", "[1, 2]", {400}),
    ("bad JSON", "/v1/completions", '"a string"', {400}),
    ("bad JSON", "/v1/completions", "null", {400}),
    ("bad JSON", "/v1/completions", "", {400}),
    ("bad JSON", "/v1/completions", b"\xff\xfe{}", {400}),
    ("bad JSON", "/v1/completions", "[" * 100_000 + "]" * 100_000, {400, 413}),
    ("bad JSON", "/v1/completions", "[" * 20_000 + "]" * 20_000, {400}),
    ("bad JSON", "/v1/completions", '{"model": "tiny", "prompt": "hi", "max_tokens": ' + "9" * 5000 + "}", {400}),
    ("bad JSON", "/v1/completions", '{"model": "tiny", "prompt": "hi", "temperature": NaN}', {400}),
    ("bad JSON", "/v1/completions", '{"model": "tiny", "prompt": "hi", "temperature": Infinity}', {400}),
    ("fields", "/v1/completions", {"prompt": "hi"}, {400}),
    ("fields", "/v1/completions", with_(OK, model="other"), {404}),
    ("fields", "/v1/completions", {"model": "tiny"}, {400}),
    ("fields", "/v1/completions", with_(OK, prompt=""), {400}),
    ("fields", "/v1/completions", with_(OK, prompt=[]), {400}),
    ("fields", "/v1/completions", with_(OK, prompt=["a", "b"]), {400}),
    ("fields", "/v1/completions", with_(OK, prompt=[1, 2, 10**9]), {400}),
    ("fields", "/v1/completions", with_(OK, prompt=[1, -5]), {400}),
    ("fields", "/v1/completions", with_(OK, max_tokens=0), {400}),
    ("fields", "/v1/completions", with_(OK, max_tokens=-1), {400}),
    ("fields", "/v1/completions", with_(OK, max_tokens="ten"), {400}),
    ("fields", "/v1/completions", with_(OK, max_tokens=10**12), {400}),
    ("fields", "/v1/completions", with_(OK, n=2), {400}),
    ("fields", "/v1/completions", with_(OK, stream="yes"), {400}),
    ("fields", "/v1/completions", with_(OK, echo=True), {400}),
    ("fields", "/v1/completions", with_(OK, best_of=2), {400}),
    ("fields", "/v1/completions", with_(OK, suffix="x"), {400}),
    ("fields", "/v1/completions", with_(OK, logit_bias={"1": 5}), {400}),
    ("fields", "/v1/completions", with_(OK, presence_penalty=0.5), {400}),
    ("fields", "/v1/completions", with_(OK, frequency_penalty=-1), {400}),
    ("fields", "/v1/completions", with_(OK, logprobs=9), {400}),
    ("fields", "/v1/completions", with_(OK, fastkv={"method": "snapkv", "other": 1}), {400}),
    ("fields", "/v1/chat/completions", with_(CHAT, messages=[]), {400}),
    ("fields", "/v1/chat/completions", with_(CHAT, messages=[{"role": "wizard", "content": "hi"}]), {400}),
    ("fields", "/v1/chat/completions", with_(CHAT, messages=[{"role": "user", "content": None}]), {400}),
    ("fields", "/v1/chat/completions", with_(CHAT, messages=[{"role": "user"}]), {400}),
    ("fields", "/v1/chat/completions", with_(CHAT, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), {400}),  # fmt: skip
    ("fields", "/v1/chat/completions", with_(CHAT, tools=[{"type": "function"}]), {400}),
    ("fields", "/v1/chat/completions", with_(CHAT, response_format={"type": "json_object"}), {400}),
    ("fields", "/v1/chat/completions", with_(CHAT, top_logprobs=3), {400}),
    ("fields", "/v1/chat/completions", with_(CHAT, logprobs=True, top_logprobs=21), {400}),
    ("fields", "/v1/chat/completions", with_(CHAT, stream_options={"include_usage": True}), {400}),
    ("unicode", "/v1/completions", '{"model": "tiny", "prompt": "a \\ud800 b", "max_tokens": 2}', {400}),
    ("unicode", "/v1/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}', {400}),  # fmt: skip
    ("unicode", "/v1/completions", '{"model": "tiny", "prompt": "hi", "stop": ["\\ud83d"], "max_tokens": 2}', {400}),
    ("unicode", "/v1/completions",
     '{"model": "tiny", "prompt": "hi", "fastkv": {"method": "snapkv\\ud800"}, "max_tokens": 2}', {400}),  # fmt: skip
    ("unicode", "/v1/completions", with_(OK, prompt="Grüße 🌍 東京 \u0000 \u200b end"), {200}),
    ("unicode", "/v1/chat/completions", with_(CHAT, messages=[{"role": "user", "content": "🌍" * 50}]), {200}),
    ("specs and knobs", "/v1/completions", with_(OK, fastkv={"method": "fastkv(**a, bogus=1)"}), {400}),
    ("specs and knobs", "/v1/completions", with_(OK, fastkv={"method": "+".join(["fastkv"] * 30000)}), {400, 413}),
    ("specs and knobs", "/v1/completions", with_(OK, fastkv={"method": "(" * 20000 + ")" * 20000}), {400, 413}),
    ("specs and knobs", "/v1/completions", with_(OK, fastkv={"method": "pyramidkv(budget=" + "9" * 400 + ")"}),
     {400}),  # fmt: skip
    ("specs and knobs", "/v1/completions", with_(OK, fastkv={"method": "snapkv(kernel_size=20000001)"}), {400}),
    ("specs and knobs", "/v1/completions", with_(OK, fastkv={"method": "snapkv(window_size=30000)"}), {400}),
    ("specs and knobs", "/v1/completions", with_(OK, fastkv={"method": "h2o(chunk_mib=100000000)"}), {400}),
    ("specs and knobs", "/v1/completions", with_(OK, fastkv={"method": "fastkv(tsp_rate=nan)"}), {400}),
    ("specs and knobs", "/v1/completions", with_(OK, fastkv={"method": "fastkv(tsp_layer=999)"}), {400}),
    ("specs and knobs", "/v1/completions", with_(OK, fastkv={"method": "fastkv(tsp_len=-5)"}), {400}),
    ("specs and knobs", "/v1/completions", with_(OK, fastkv={"method": "__import__('os').system('x')"}), {400}),
    ("specs and knobs", "/v1/completions", with_(OK, fastkv={"method": "nosuch"}), {400}),
    ("specs and knobs", "/v1/completions", with_(OK, fastkv={"method": "fastkv(tsp_layer=1)+adakv(budget=64)"}), {200}),
    ("sampling", "/v1/completions", with_(OK, temperature=1e-40, seed=1), {200}),
    ("sampling", "/v1/completions", with_(OK, temperature=5e-38, seed=1), {200}),
    ("sampling", "/v1/completions", with_(OK, temperature=2.0, top_p=1e-9, seed=3), {200}),
    ("sampling", "/v1/completions", with_(OK, temperature=2.5), {400}),
    ("sampling", "/v1/completions", with_(OK, temperature=-0.1), {400}),
    ("sampling", "/v1/completions", with_(OK, top_p=0), {400}),
    ("sampling", "/v1/completions", with_(OK, seed=2**64), {400}),
    ("sampling", "/v1/completions", with_(OK, seed=-(2**63)), {200}),
    ("sampling", "/v1/completions", with_(OK, stop=["x"] * 17), {400}),
    ("sampling", "/v1/completions", with_(OK, stop=["y" * 600]), {400}),
    ("sampling", "/v1/completions", with_(OK, stop=[""]), {400}),
    ("sampling", "/v1/completions", with_(OK, stop="a", temperature=1.0, seed=9), {200}),
    ("sizes", "/v1/completions", with_(OK, prompt="word " * 20000), {413}),
    ("sizes", "/v1/completions", with_(OK, prompt="word " * 1500), {400}),
    ("sizes", "/v1/completions", with_(OK, prompt=list(range(5, 800))), {400}),
    ("sizes", "/v1/chat/completions", with_(CHAT, messages=[{"role": "user", "content": "x"}] * 2000), {400, 413}),
    ("compatibility", "/v1/completions", with_(OK, temperature=None, top_p=None, n=None, stream=None), {200}),
    ("compatibility", "/v1/chat/completions", with_(CHAT, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]), {200}),  # fmt: skip
    ("compatibility", "/v1/chat/completions", with_(CHAT, max_tokens=None, max_completion_tokens=2), {200}),
    ("compatibility", "/v1/chat/completions", with_(CHAT, user="someone", presence_penalty=0, logit_bias={}), {200}),
    ("compatibility", "/nope", "{}", {404}),
    ("compatibility", "/v1/models", "{}", {405}),
]
# fmt: on


def check_refusal(response: httpx.Response, what) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:300])
    text = response.text
    assert not any(leak in text for leak in LEAKS), (what, text[:300])
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["message"] and error["type"] and error["code"], (what, error)
    assert response.headers.get("x-request-id", "").startswith("req-"), what


def test_the_battery(server, llm):
    before = httpx.post(server.url + "/v1/completions", json=OK, timeout=60).json()["choices"][0]["text"]
    counts: Counter = Counter()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for kind, path, body, allowed in CASES:
            if path == "/v1/models":
                response = http.post(path, content=body)
            elif isinstance(body, dict):
                response = http.post(path, json=body)
            else:
                response = http.post(path, content=raw(body), headers={"content-type": "application/json"})
            assert response.status_code in allowed, (kind, str(body)[:120], response.status_code, response.text[:300])
            check_refusal(response, (kind, str(body)[:80]))
            counts[kind] += 1
    counts.update(bursts(server) | disconnects(server) | slow_clients(server) | compatibility(server))
    counts.update(engine_abuse(server))
    print("\nbattery:", dict(counts), "in all", sum(counts.values()))
    assert sum(counts.values()) >= 120

    # afterwards: the same greedy answer, and nothing running or queued
    def busy() -> float:
        return server.metric("fastkv_running_requests") + server.metric("fastkv_queued_requests")

    deadline = time.time() + 10
    while busy() and time.time() < deadline:
        time.sleep(0.1)
    assert busy() == 0
    after = httpx.post(server.url + "/v1/completions", json=OK, timeout=60).json()["choices"][0]["text"]
    assert after == before
    assert server.metric("fastkv_requests_total") > 0  # counted, by status
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def bursts(server) -> Counter:
    """More requests at once than rows and queue: some wait, the rest get 429 with Retry-After; none fails."""

    def ask(i: int) -> httpx.Response:
        return httpx.post(server.url + "/v1/completions", json=with_(OK, prompt=f"burst {i} " * 20, max_tokens=8),
                          timeout=120)  # fmt: skip

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(ask, range(24)))
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 429} and statuses[200] >= 4 and statuses[429] >= 1, statuses
    for r in responses:
        check_refusal(r, "burst")
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "server_busy"
    return Counter({"bursts": len(responses)})


def disconnects(server) -> Counter:
    """Clients that go away mid-stream or mid-request: their requests are cancelled, nothing else notices."""
    n = 0
    for _ in range(4):
        body = with_(OK, max_tokens=300, ignore_eos=True, stream=True)
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        n += 1
    for _ in range(3):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v1/completions", json=with_(OK, max_tokens=400, ignore_eos=True), timeout=0.3)
        n += 1
    return Counter({"disconnects": n})


def slow_clients(server) -> Counter:
    """Half-sent request heads are closed after the header timeout; a connection that sends nothing too."""
    sockets = []
    for i in range(6):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        if i % 2:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")  # never finished
        sockets.append(s)
    time.sleep(1.6)  # past the server's 1 s header timeout
    for s in sockets:
        s.settimeout(3)
        assert s.recv(1024) == b"", "a slow client's connection is still open"
        s.close()
    # a body that never finishes arriving: the request waits for it, nothing else does
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: 500\r\n\r\n{\"model\": ")  # fmt: skip
    started = time.perf_counter()
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    assert time.perf_counter() - started < 1.0
    s.close()
    return Counter({"slow clients": len(sockets) + 1})


def compatibility(server) -> Counter:
    """What the openai client and common clients rely on: max_completion_tokens, include_usage, logprobs."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    n = 0
    short = client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_completion_tokens=2,
                                           temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
    assert short.usage.completion_tokens == 2
    n += 1
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=3, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    n += 1
    chat = client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=3, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)  # greedy: the chosen one is the best
    n += 1
    text = client.completions.create(model="tiny", prompt="Hello there", max_tokens=3, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True})  # fmt: skip
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    n += 1
    # Streamed, every token is reported once, in order, with the logprobs the same request gets unstreamed.
    pieces = list(client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=6,
                                                 temperature=0, logprobs=True, top_logprobs=2, stream=True,
                                                 extra_body={"ignore_eos": True}))  # fmt: skip
    streamed = [t for c in pieces if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    whole = client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    # The second request starts from the first's stored prefix: its sums run in another order (float rounding).
    same = whole.choices[0].logprobs.content
    assert [t.token for t in streamed] == [t.token for t in same]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in same], abs=1e-4)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == whole.choices[0].message.content
    n += 1
    texts = list(client.completions.create(model="tiny", prompt="Hello there", max_tokens=5, temperature=0, logprobs=1,
                                           stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
    parts = [c.choices[0].logprobs for c in texts if c.choices[0].logprobs is not None]
    assert sum(len(p.tokens) for p in parts) == 5
    offsets = [o for p in parts for o in p.text_offset]
    assert offsets == sorted(offsets) and offsets[0] == 0
    return Counter({"compatibility": n + 1})


def engine_abuse(server) -> Counter:
    """Requests that push the engine: a prompt at the limit, a long generation cut off, a many-stop request."""
    n = 0
    at_limit = httpx.post(server.url + "/v1/completions", json=with_(OK, prompt=list(range(5, 705)), max_tokens=2),
                          timeout=120)  # fmt: skip
    assert at_limit.status_code == 200
    n += 1
    stops = [f"s{i}" for i in range(16)]
    many = httpx.post(server.url + "/v1/completions", json=with_(OK, stop=stops, max_tokens=20), timeout=60)
    assert many.status_code == 200
    n += 1
    results: list[int] = []

    def long_stream() -> None:
        body = with_(OK, max_tokens=200, ignore_eos=True, stream=True)
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            results.append(sum(1 for line in r.iter_lines() if line.startswith("data: {")))

    thread = threading.Thread(target=long_stream)
    thread.start()
    time.sleep(0.3)
    beside = httpx.post(server.url + "/v1/completions", json=with_(OK, prompt=list(range(5, 600))), timeout=120)
    thread.join(120)
    assert beside.status_code == 200 and results and results[0] >= 100
    return Counter({"engine abuse": n + 2})


def test_a_failing_row_ends_its_request_alone(server, monkeypatch):
    """One request's sampling fails inside the shared decode step: it gets an error, the stream beside it ends
    normally with the tokens it would get alone."""
    import fastkv.batch as batch

    real = batch.sample

    def broken(logits, params, generator):
        if params.seed == 666:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, generator)

    alone = httpx.post(server.url + "/v1/completions", json=with_(OK, max_tokens=40, ignore_eos=True), timeout=60)
    monkeypatch.setattr(batch, "sample", broken)
    out: dict = {}

    def stream_it() -> None:
        body = with_(OK, max_tokens=40, ignore_eos=True, stream=True)
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            parts = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        out["text"] = "".join(p["choices"][0]["text"] for p in parts if "choices" in p)

    thread = threading.Thread(target=stream_it)
    thread.start()
    time.sleep(0.2)
    failing = httpx.post(server.url + "/v1/completions", json=with_(OK, temperature=1.0, seed=666, max_tokens=20),
                         timeout=60)  # fmt: skip
    thread.join(60)
    assert failing.status_code == 503 and failing.json()["error"]["code"] == "engine_error"
    assert "probability" not in failing.text and "req-" in failing.json()["error"]["message"]
    assert out["text"] == alone.json()["choices"][0]["text"]


def test_access_needs_the_key_and_a_loopback_host(llm):
    limits = ServeLimits(api_key="s3cret", allowed_hosts=frozenset({"localhost", "127.0.0.1"}))
    live = ServerThread(llm, "tiny", "snapkv(budget=64)", kv_mib=64, prefix_cache_mib=0, limits=limits)
    try:
        url = live.url + "/v1/completions"
        assert httpx.post(url, json=OK).status_code == 401
        assert httpx.post(url, json=OK, headers={"authorization": "Bearer wrong"}).status_code == 401
        good = {"authorization": "Bearer s3cret"}
        assert httpx.post(url, json=OK, headers=good, timeout=60).status_code == 200
        evil = httpx.post(url, json=OK, headers={**good, "host": "evil.example:8000"})
        assert evil.status_code == 403 and evil.json()["error"]["code"] == "host_not_allowed"
        assert httpx.get(live.url + "/health").status_code == 200  # health needs no key
        assert httpx.get(live.url + "/metrics").status_code == 401
    finally:
        live.close()


def test_a_dead_engine_says_so_and_fails_waiting_requests(llm):
    live = ServerThread(llm, "tiny", "snapkv(budget=64)", kv_mib=64, prefix_cache_mib=0)
    try:
        scheduler = live.app.state.scheduler

        def die(*args, **kwargs):
            raise SystemExit("simulated")

        scheduler._prefill = die  # the next admitted request kills the engine thread
        started = time.perf_counter()
        dying = httpx.post(live.url + "/v1/completions", json=OK, timeout=30)
        assert dying.status_code == 503 and time.perf_counter() - started < 5
        health = httpx.get(live.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "dead"
        refused = httpx.post(live.url + "/v1/completions", json=OK, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
    finally:
        live.close()


def test_sigterm_bounds_the_shutdown(tiny_dir):
    """SIGTERM: waiting requests fail at once, the running one gets --shutdown-timeout to finish, the process
    exits soon after."""
    import os
    import signal
    import subprocess
    import sys

    from fastkv.serve.thread import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "fastkv", "serve", "--model", str(tiny_dir), "--dtype", "float32", "--quantize",
           "none", "--method", "snapkv(budget=64)", "--port", str(port), "--max-batch", "1", "--max-queue", "4",
           "--shutdown-timeout", "2", "--prefix-cache-mib", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = with_(OK, model=str(tiny_dir), max_tokens=3000, ignore_eos=True, stream=True)
        events: list[str] = []

        def running() -> None:
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                    events.extend(line for line in r.iter_lines() if line)
            except httpx.HTTPError as e:
                events.append(f"cut: {type(e).__name__}")

        thread = threading.Thread(target=running)
        thread.start()
        time.sleep(1.0)
        with ThreadPoolExecutor(2) as pool:
            queued = [pool.submit(httpx.post, url + "/v1/completions", json=with_(OK, model=str(tiny_dir)), timeout=60)
                      for _ in range(2)]  # fmt: skip
            time.sleep(0.5)
            stopped = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            answers = [q.result() for q in queued]
        assert all(a.status_code == 503 for a in answers), [a.text for a in answers]
        assert time.perf_counter() - stopped < 2.0  # they did not wait for the running request
        proc.wait(timeout=20)
        # A stop that SIGTERM asked for, done cleanly, exits 0 (uvicorn alone would re-raise the signal).
        errors = proc.stderr.read()
        assert time.perf_counter() - stopped < 15 and proc.returncode == 0, errors[-2000:]
        assert b"Traceback" not in errors, errors.decode()[-4000:]
        thread.join(10)
        assert events and not thread.is_alive()  # the running stream ended (cut off or closed), no hang
    finally:
        if proc.poll() is None:
            proc.kill()
