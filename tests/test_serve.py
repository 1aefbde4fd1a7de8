"""`fastkv serve` on a live 127.0.0.1 server, through the real openai client and plain HTTP."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from fastkv import LLM  # noqa: E402
from fastkv.serve.thread import ServerThread  # noqa: E402

METHOD = "snapkv(budget=64)"


class Live(ServerThread):
    """A server in a thread, with an openai client for it (served as "tiny" unless name= says otherwise)."""

    def __init__(self, llm, **options) -> None:
        super().__init__(llm, options.pop("name", "tiny"), options.pop("method", METHOD), **options)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM.load(str(tiny_dir), dtype="float32", progress=False)


@pytest.fixture(scope="module")
def live(llm):
    server = Live(llm, kv_mib=64, max_batch=4, max_queue=8)
    yield server
    server.close()


def question(i: int) -> str:
    return f"Item {i}: " + " ".join(f"w{j * i % 97}" for j in range(40 + 9 * i))


def test_models_health_and_a_completion(live, llm):
    assert [m.id for m in live.client.models.list()] == ["tiny"]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    done = live.client.completions.create(model="tiny", prompt=question(1), max_tokens=6, temperature=0)
    alone = llm.generate(question(1), METHOD, max_tokens=6, chat=False)  # a completion is the text as it is
    assert done.choices[0].text == alone.text
    assert (
        done.usage.completion_tokens == len(alone.token_ids) and done.usage.prompt_tokens == alone.stats.prompt_tokens
    )
    assert done.choices[0].finish_reason in ("length", "stop")
    extra = done.model_extra["fastkv"]
    assert extra["method"] == alone.stats.method and extra["kv_bytes"] == alone.stats.kv_bytes


def test_chat_streams_what_it_answers(live, llm):
    messages = [{"role": "user", "content": question(2)}]
    whole = live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    pieces, finish = [], None
    for chunk in live.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True
    ):
        delta = chunk.choices[0].delta
        pieces.append(delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    alone = llm.generate(question(2), METHOD, max_tokens=8, chat=True)
    assert whole.choices[0].message.content == alone.text


def test_concurrent_requests_answer_as_sequential_generation(live, llm):
    def ask(i: int) -> str:
        method = {"fastkv": {"method": "fastkv(tsp_layer=1, tsp_len=48, budget=64)"}} if i % 2 else None
        reply = live.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": question(i)}], max_tokens=10, temperature=0,
            extra_body=method,
        )  # fmt: skip
        return reply.choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    for i, answer in enumerate(answers):
        method = "fastkv(tsp_layer=1, tsp_len=48, budget=64)" if i % 2 else METHOD
        assert answer == llm.generate(question(i), method, max_tokens=10, chat=True).text, i


def test_a_disconnect_mid_stream_frees_its_slot(live):
    body = {"model": "tiny", "prompt": question(3), "max_tokens": 400, "temperature": 0, "stream": True}
    cancelled = live.metric("fastkv_cancelled_total")
    with httpx.stream("POST", live.url + "/v1/completions", json=body) as response:
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    deadline = time.time() + 10
    while live.metric("fastkv_cancelled_total") == cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert live.metric("fastkv_cancelled_total") == cancelled + 1
    assert live.metric("fastkv_running_requests") == 0 and live.metric("fastkv_kv_cache_bytes") == 0
    again = live.client.completions.create(model="tiny", prompt=question(3), max_tokens=3, temperature=0)
    assert again.usage.completion_tokens >= 1


BAD = [
    ("not json", "invalid_json", None),
    (json.dumps({"model": "tiny"}), "invalid_value", "prompt"),
    (json.dumps({"model": "other", "prompt": "hi"}), "model_not_found", "model"),
    (json.dumps({"model": "tiny", "prompt": "hi", "temperature": 5}), "invalid_value", "temperature"),
    (json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 0}), "invalid_value", "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "hi", "top_p": 0}), "invalid_value", "top_p"),
    (json.dumps({"model": "tiny", "prompt": "hi", "n": 2}), "invalid_value", "n"),
    (json.dumps({"model": "tiny", "prompt": "hi", "fastkv": {"method": "snapkv("}}), "invalid_method", "fastkv.method"),
    (json.dumps({"model": "tiny", "prompt": "hi", "fastkv": {"method": "snapkv(kernal=3)"}}), "invalid_method", None),
    (json.dumps({"model": "tiny", "prompt": "word " * 5000}), "context_length_exceeded", "prompt"),
    (json.dumps({"model": "tiny", "prompt": [1, 2, 10**9]}), None, "prompt"),
]


def test_malformed_requests_get_openai_errors_and_the_server_stays_up(live):
    with httpx.Client(base_url=live.url) as http:
        for i in range(100):
            body, code, param = BAD[i % len(BAD)]
            response = http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500, (body, response.text)
            error = response.json()["error"]
            assert error["message"] and error["type"] == "invalid_request_error"
            assert code is None or error["code"] == code, (body, error)
            assert param is None or error["param"] == param, (body, error)
        chat = http.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    good = live.client.completions.create(model="tiny", prompt="hello", max_tokens=2)
    assert good.choices[0].text is not None


def test_a_request_waits_for_memory_and_a_full_queue_refuses(llm):
    prompt = question(9) * 3
    tokens = len(llm.tokenizer(prompt)["input_ids"])  # about 1060: with 2000 new tokens, within 4096
    entry = 2 * llm.adapter.num_kv_heads * llm.adapter.head_dim * 4 * llm.adapter.num_layers
    server = Live(llm, kv_mib=1.5 * entry * (tokens + 2000) / 2**20, max_batch=8, max_queue=1)
    try:
        full = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 2000,
            "ignore_eos": True,
            "fastkv": {"method": "fullkv"},
        }
        with httpx.stream("POST", server.url + "/v1/completions", json={**full, "stream": True}) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # kept: a dropped iterator would close the stream
            next(lines)  # FullKV request 1 holds most of the memory now
            waiting = ThreadPoolExecutor(1).submit(
                httpx.post, server.url + "/v1/completions", json={**full, "max_tokens": 2}, timeout=60
            )
            deadline = time.time() + 10
            while httpx.get(server.url + "/health").json()["queued"] < 1 and time.time() < deadline:
                time.sleep(0.02)
            assert httpx.get(server.url + "/health").json()["queued"] == 1  # request 2 waits for memory
            refused = httpx.post(server.url + "/v1/completions", json=full)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "server_busy"
        assert waiting.result().status_code == 200  # admitted once request 1 went away
    finally:
        server.close()


def test_admission_holds_many_more_fastkv_requests_than_fullkv_in_the_same_memory(llm):
    import asyncio

    from fastkv import SamplingParams
    from fastkv.serve.scheduler import Scheduler

    ids = llm.tokenizer(question(9) * 6)["input_ids"]
    entry = 2 * llm.adapter.num_kv_heads * llm.adapter.head_dim * 4
    limit = int(2.5 * entry * llm.adapter.num_layers * (len(ids) + 64))  # two and a half FullKV requests
    loop = asyncio.new_event_loop()
    held = {}
    for spec in ("fullkv", "fastkv(tsp_layer=1, tsp_len=48, budget=96)"):
        # its thread is not started: we drive it, one whole prefill after the other (no decode steps between)
        scheduler = Scheduler(llm, limit, max_batch=64, max_queue=64, prefill_chunk=None)
        method, _ = llm.resolve(spec)
        for _ in range(40):
            scheduler.submit(scheduler.make_job(ids, method, SamplingParams(64), loop))
        while (job := scheduler._admissible()) is not None:
            scheduler.queue.popleft()
            scheduler.jobs[job.id] = job
            scheduler._prefill(job)
            assert scheduler.kv_bytes_now() <= limit  # what was reserved before prefill held
        held[spec] = len(scheduler.batch.rows)
    loop.close()
    assert held["fullkv"] == 2
    assert held["fastkv(tsp_layer=1, tsp_len=48, budget=96)"] >= 8 * held["fullkv"]


def test_cli_refuses_bad_options_before_loading(tiny_dir):
    from typer.testing import CliRunner

    from fastkv.cli import app

    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir), "--kv-mib", "0"])
    assert result.exit_code == 2 and "--kv-mib must be positive" in result.stderr
    result = CliRunner().invoke(app, ["serve", "--model", str(tiny_dir), "--method", "snapkv(budget=-1)"])
    assert result.exit_code == 2 and "--method" in result.stderr and "budget" in result.stderr


def test_replica_metrics_merge_into_one_family_per_name_labelled_by_replica():
    from fastkv.serve.metrics import Metrics
    from fastkv.serve.ray_app import merged_metrics

    a, b = Metrics(), Metrics()
    a.requests.labels("200").inc(3)
    b.requests.labels("200").inc(5)
    b.requests.labels("429").inc()
    a.running.set(2)
    text = merged_metrics([("r2", list(b.registry.collect())), ("r1", list(a.registry.collect()))]).decode()
    assert text.count("# HELP fastkv_requests_total ") == 1 and text.count("# TYPE fastkv_running_requests ") == 1
    series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[0] != "#"}
    assert series['fastkv_requests_total{replica="r1",status="200"}'] == 3
    assert series['fastkv_requests_total{replica="r2",status="200"}'] == 5
    assert series['fastkv_requests_total{replica="r2",status="429"}'] == 1
    assert series['fastkv_running_requests{replica="r1"}'] == 2 and series['fastkv_running_requests{replica="r2"}'] == 0


def test_a_chat_turn_reuses_the_previous_turns_prefix(tiny_dir):
    """Two turns through the openai client: the second shares the first's prompt through the chat template, so
    it reports the tokens it took from the store, and it answers as a fresh prefill of its prompt does."""
    llm = LLM.load(str(tiny_dir), dtype="float32", progress=False)
    method = "fastkv(tsp_layer=1, tsp_len=128, budget=64)"
    server = Live(llm, method=method, kv_mib=64, prefix_cache_mib=32)
    try:
        first = [{"role": "user", "content": question(7) * 3}]
        one = server.client.chat.completions.create(model="tiny", messages=first, max_tokens=6, temperature=0)
        second = [*first, {"role": "assistant", "content": one.choices[0].message.content},
                  {"role": "user", "content": "And the last item?"}]  # fmt: skip
        two = server.client.chat.completions.create(model="tiny", messages=second, max_tokens=6, temperature=0)
        assert one.model_extra["fastkv"]["prefix_tokens_reused"] == 0
        reused = two.model_extra["fastkv"]["prefix_tokens_reused"]
        assert reused >= one.usage.prompt_tokens - 64  # all of turn 1 but what falls in the last block
        assert server.metric("fastkv_prefix_hits_total") == 1 and server.metric("fastkv_prefix_misses_total") == 1
        assert server.metric("fastkv_prefix_tokens_reused_total") == reused
        assert 0 < server.metric("fastkv_prefix_store_bytes") <= 32 * 2**20
        fresh = LLM.load(str(tiny_dir), dtype="float32", progress=False)  # no store: a fresh prefill
        assert two.choices[0].message.content == fresh.generate(second, method, max_tokens=6, chat=True).text
    finally:
        server.close()


def test_a_request_asks_for_accuracy_and_the_answer_names_the_setting(live, llm):
    from fastkv.frontier import Frontier, Setting

    chosen = "fastkv(tsp_layer=1, tsp_len=48, budget=64)"
    settings = (Setting(chosen, 60, 1.5, 0.5, 2.5, 1.6, 0.3), Setting("fastkv(tsp_layer=2, tsp_len=48, budget=64)",
                                                                       50, 9.0, 7, 11, 1.9, 0.2))  # fmt: skip
    llm.frontier = Frontier("tiny", "a made-up suite", "here", "today", settings)
    try:
        body = {"fastkv": {"method": "fastkv(max_loss=0.02)"}}
        done = live.client.completions.create(model="tiny", prompt=question(4), max_tokens=5, temperature=0,
                                              extra_body=body)  # fmt: skip
        extra = done.model_extra["fastkv"]
        assert extra["method"] == llm.generate(question(4), chosen, max_tokens=5, chat=False).stats.method
        assert "max_loss=0.02" in extra["defaults"] and "loss 1.5 points" in extra["defaults"]
        with pytest.raises(openai.BadRequestError, match="the closest is"):
            live.client.completions.create(model="tiny", prompt=question(4), max_tokens=5,
                                           extra_body={"fastkv": {"method": "fastkv(max_loss=0.001)"}})  # fmt: skip
    finally:
        llm.frontier = None


def test_decode_budgets_admit_more_long_generations_and_metrics_count_evictions(llm):
    import asyncio

    from fastkv import SamplingParams
    from fastkv.serve.scheduler import Scheduler

    ids = llm.tokenizer(question(1))["input_ids"]
    new = 900
    entry = 2 * llm.adapter.num_kv_heads * llm.adapter.head_dim * 4
    limit = int(2.5 * entry * llm.adapter.num_layers * (len(ids) + new))  # two and a half unbudgeted requests
    loop = asyncio.new_event_loop()
    held = {}
    budgeted = "fullkv(decode_budget=32, decode_interval=16)"
    for spec in ("fullkv", budgeted):
        scheduler = Scheduler(llm, limit, max_batch=64, max_queue=64, prefill_chunk=None)
        method, _ = llm.resolve(spec)
        for _ in range(40):
            scheduler.submit(scheduler.make_job(ids, method, SamplingParams(new, ignore_eos=True), loop))
        while (job := scheduler._admissible()) is not None:
            scheduler.queue.popleft()
            scheduler.jobs[job.id] = job
            scheduler._prefill(job)
        held[spec] = len(scheduler.batch.rows)
        for _ in range(60):  # the generations run past their budgets; the batch's memory stays within the limit
            scheduler.batch.step()
            assert scheduler.kv_bytes_now() <= limit
    loop.close()
    # a budgeted row reserves its prompt plus 32 + 16 generated entries per layer, not its prompt plus 900
    assert held["fullkv"] == 2 and held[budgeted] == int(2.5 * (len(ids) + new) / (len(ids) + 48)) >= 4 * 2

    server = Live(llm, method=budgeted, kv_mib=64)
    try:
        done = server.client.completions.create(model="tiny", prompt=question(3), max_tokens=80, temperature=0,
                                                extra_body={"ignore_eos": True})  # fmt: skip
        extra = done.model_extra["fastkv"]
        assert done.usage.completion_tokens == 80 and extra["kv_evicted"] > 0
        assert extra["kv_bytes_end"] < extra["kv_bytes"] + 80 * entry * llm.adapter.num_layers
        metrics = httpx.get(server.url + "/metrics").text
        evicted = [line for line in metrics.splitlines() if line.startswith("fastkv_decode_evicted_entries_total")]
        assert evicted and float(evicted[0].split()[-1]) == extra["kv_evicted"]
    finally:
        server.close()
