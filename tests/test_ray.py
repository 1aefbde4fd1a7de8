"""Ray: evaluation spread over workers, and `fastkv serve` as Ray Serve replicas, on a local 2-CPU cluster.

Slow (a Ray cluster starts once for the module, about half a minute here), but CI runs them.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from fastkv import LLM  # noqa: E402
from fastkv.eval.runner import Item, run  # noqa: E402
from fastkv.methods import format_spec, parse  # noqa: E402
from fastkv.serve.thread import metric_total  # noqa: E402

pytestmark = pytest.mark.slow
METHOD = "snapkv(budget=64)"
SPECS = ["fullkv", "snapkv(budget=64)", "fastkv(kernel_size=13)"]


@pytest.fixture(scope="module")
def cluster():
    from fastkv.serve.ray_app import PATIENT_PROXY

    for key, value in PATIENT_PROXY.items():  # as `fastkv serve --ray` sets them for a cluster it starts
        os.environ.setdefault(key, value)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM.load(str(tiny_dir), dtype="float32", progress=False)


def items(n: int) -> list[Item]:
    words = [" ".join(f"w{(i * 31 + j * 7) % 101}" for j in range(60 + 20 * i)) for i in range(n)]
    return [Item("t", i, text, True, 6, ["w1"], lambda p: float("w1" in p)) for i, text in enumerate(words)]


def evaluate(llm, tiny_dir, out, chosen: list[Item], answer=None) -> list[dict]:
    methods = {format_spec(m): m for m in (parse(s).bind(llm.adapter.num_layers) for s in SPECS)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker (1 CPU): the same float rounding
    try:
        run(llm, str(tiny_dir), "x", methods, chosen, out, {}, progress=False, time_prefill=False, answer=answer)
    finally:
        torch.set_num_threads(threads)
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def answers(rows: list[dict]) -> list[tuple]:
    return sorted((r["method"], r["index"], r["prediction"], r.get("first_token_kl")) for r in rows)


def test_eval_on_ray_equals_local_survives_a_killed_worker_and_resumes(cluster, llm, tiny_dir, tmp_path):
    from fastkv.eval.distributed import RayAnswer

    local = evaluate(llm, tiny_dir, tmp_path / "local", items(6))
    answer = RayAnswer(str(tiny_dir), "float32", "cpu", workers=2, cpus=1)
    try:
        # A run stopped after 2 items, then resumed on Ray, where both workers are killed after the first
        # job comes back: the job in flight is lost and redone by a new worker, nothing else.
        evaluate(llm, tiny_dir, tmp_path / "ray", items(2), answer)
        assert answer.computed == 2
        inner = answer.__call__

        def killing(jobs, on_start):
            stream = inner(jobs, on_start)
            yield next(stream)
            for pid in answer.pids():
                os.kill(pid, signal.SIGKILL)
            yield from stream

        rows = evaluate(llm, tiny_dir, tmp_path / "ray", items(6), RayCall(answer, killing))
        assert answer.lost >= 1, "no job was in flight when the workers died"
        assert answer.computed == 6  # 2 before, 4 on resume: nothing twice
        keys = [(r["method"], r["index"]) for r in rows]
        assert len(keys) == len(set(keys)) == 6 * len(SPECS)  # nothing lost, nothing written twice
        assert answers(rows) == answers(local)
    finally:
        answer.close()


class RayCall:
    """`answer` with a wrapped call (the runner calls answer(jobs, on_start))."""

    def __init__(self, answer, call) -> None:
        self.answer, self.call = answer, call

    def __call__(self, jobs, on_start):
        return self.call(jobs, on_start)


def test_eval_cli_with_ray_gives_the_local_predictions(cluster, tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from fastkv.cli import app

    args = ["eval", "niah", "--model", str(tiny_dir), "--methods", "fullkv,snapkv(budget=64)", "--lengths", "512",
            "--depths", "0,1", "--no-time-prefill"]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "local")])
    finally:
        torch.set_num_threads(threads)
    assert local.exit_code == 0, local.output
    spread = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ray"), "--ray", "auto", "--workers", "2"])
    assert spread.exit_code == 0, spread.output

    def rows(name):
        return [json.loads(x) for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]

    assert len(rows("ray")) == 4 and answers(rows("ray")) == answers(rows("local"))
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "bad"), "--ray", "auto", "--workers", "0"])
    assert bad.exit_code == 2 and "workers must be >= 1" in bad.output


@pytest.fixture(scope="module")
def replicas(cluster, tiny_dir):
    from ray import serve

    from fastkv.serve.ray_app import ReplicaOptions, Scaling, start
    from fastkv.serve.thread import free_port

    port = free_port()
    options = ReplicaOptions(str(tiny_dir), METHOD, "float32", kv_mib=64, max_batch=4, max_queue=8)
    start(options, Scaling(replicas=2, cpus=1), "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    yield url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    serve.delete("fastkv")


def question(i: int) -> str:
    return f"Item {i}: " + " ".join(f"w{j * i % 97}" for j in range(40 + 9 * i))


def test_two_replicas_stream_and_answer_and_share_the_load(replicas, llm):
    url, client = replicas
    done = client.completions.create(model=str(llm.name), prompt=question(1), max_tokens=6, temperature=0)
    assert done.choices[0].text == llm.generate(question(1), METHOD, max_tokens=6, chat=False).text
    messages = [{"role": "user", "content": question(2)}]
    whole = client.chat.completions.create(model=llm.name, messages=messages, max_tokens=8, temperature=0)
    pieces = client.chat.completions.create(model=llm.name, messages=messages, max_tokens=8, temperature=0,
                                            stream=True)  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert streamed == whole.choices[0].message.content

    def ask(i: int) -> str:
        done = client.completions.create(model=llm.name, prompt=question(i), max_tokens=4, temperature=0)
        return done.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, range(1, 17)))
    assert texts == [llm.generate(question(i), METHOD, max_tokens=4, chat=False).text for i in range(1, 17)]
    text = httpx.get(url + "/metrics").text
    served = {line.split('replica="')[1].split('"')[0]: float(line.split()[-1])
              for line in text.splitlines() if line.startswith("fastkv_requests_total{")}  # fmt: skip
    assert len(served) == 2 and all(n > 0 for n in served.values()), served  # both replicas answered


def replica_pids() -> list[int]:
    from ray import serve

    handle = serve.get_deployment_handle("fastkv", app_name="fastkv")
    found = handle.broadcast("identity").results(timeout_s=10, return_exceptions=True)
    return sorted(r["pid"] for r in found if isinstance(r, dict))


def test_a_killed_replica_fails_its_requests_clearly_and_the_deployment_recovers(replicas, llm):
    url, client = replicas
    pids = replica_pids()
    assert len(pids) == 2

    def ask(i: int) -> str:
        try:
            stream = client.completions.create(model=llm.name, prompt=question(i), max_tokens=400, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})  # fmt: skip
            return "done" if "".join(c.choices[0].text for c in stream if c.choices) else "empty"
        except (openai.APIError, httpx.HTTPError) as e:  # a status with a message, or a cut stream: named
            return f"error: {type(e).__name__}: {e}"

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(1, 9)]
        time.sleep(3)
        os.kill(pids[0], signal.SIGKILL)
        outcomes = [f.result() for f in futures]
    assert all(o == "done" or o.startswith("error: ") for o in outcomes), outcomes
    print(f"killed a replica with 8 requests in flight: {outcomes.count('done')} completed, "
          f"{sum(o.startswith('error') for o in outcomes)} errors: {outcomes}")  # fmt: skip
    deadline = time.time() + 300
    while (len(replica_pids()) < 2 or pids[0] in replica_pids()) and time.time() < deadline:
        time.sleep(1)
    now = replica_pids()
    assert len(now) == 2 and pids[0] not in now, "the deployment did not replace the killed replica"
    for i in range(4):  # later requests succeed
        done = client.completions.create(model=llm.name, prompt=question(i + 1), max_tokens=4, temperature=0)
        assert done.choices[0].text == llm.generate(question(i + 1), METHOD, max_tokens=4, chat=False).text


def test_a_client_that_goes_away_cancels_the_request_in_the_engine(replicas, llm):
    url, _ = replicas
    body = {"model": llm.name, "prompt": question(3), "max_tokens": 3000, "stream": True, "ignore_eos": True}

    before = metric_total(url, "fastkv_cancelled_total")
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                break  # one piece, then hang up
    deadline = time.time() + 30
    while metric_total(url, "fastkv_cancelled_total") <= before and time.time() < deadline:
        time.sleep(0.5)
    assert metric_total(url, "fastkv_cancelled_total") == before + 1
    assert metric_total(url, "fastkv_running_requests") == 0


def test_serve_ray_refuses_bad_scaling_before_starting_anything(tiny_dir):
    from typer.testing import CliRunner

    from fastkv.cli import app

    base = ["serve", "--ray", "--model", str(tiny_dir)]
    for extra, message in (
        (["--min-replicas", "2"], "autoscaling needs both --min-replicas and --max-replicas"),
        (["--min-replicas", "3", "--max-replicas", "2"], "need 0 <= --min-replicas <= --max-replicas"),
        (["--replicas", "0"], "--replicas must be >= 1"),
        (["--method", "fastkv(kernel_size=4)"], "kernel_size"),
    ):
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
