"""What a server says about itself and its requests (issue 27): no path of this machine reaches a client or
its log, ids are random and unique across servers and restarts, and the log names what is served and how
every request ended."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
import fastkv  # noqa: E402
from fastkv import LLM, format_spec  # noqa: E402
from fastkv.profiles import find, read, shipped_dir, user_path  # noqa: E402
from fastkv.serve.thread import ServerThread, free_port  # noqa: E402

PACKAGE = str(Path(fastkv.__file__).resolve().parent)
REPO = str(Path(fastkv.__file__).resolve().parents[2])
# A TSP length and budget for short prompts; the other knobs come from the profile.
METHOD = "fastkv(tsp_len=96, budget=64)"
REQUEST_ID = re.compile(r"req-[0-9a-f]{32}")
OK = {"model": "tiny", "prompt": "Hello there, how are", "max_tokens": 3, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 3, "temperature": 0}


@pytest.fixture(scope="module")
def profiled(tiny_dir):
    """The tiny model with qwen2.5-0.5b's shipped profile, as `LLM.load("qwen2.5-0.5b")` has it, but with a TSP
    layer this 4-layer model has (the prefix store binds the profile's own fastkv)."""
    llm = LLM.load(str(tiny_dir), dtype="float32", progress=False)
    llm.profile = read(shipped_dir() / "qwen2.5-0.5b.json")
    llm.profile.knobs = {**llm.profile.knobs, "tsp_layer": 1}
    return llm


@pytest.fixture
def server_log(caplog):
    """The records of the server's logger ("fastkv.serve", from INFO) and of uvicorn's, for the test's duration.
    uvicorn's loggers do not propagate to caplog's root handler, so its handler joins them (`watch_uvicorn`,
    once a server has started: starting one configures uvicorn's loggers afresh)."""
    caplog.set_level(logging.INFO, logger="fastkv.serve")
    touched: list[tuple[logging.Logger, int]] = []

    def watch_uvicorn() -> None:
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logger = logging.getLogger(name)
            touched.append((logger, logger.level))
            logger.setLevel(logging.INFO)
            logger.addHandler(caplog.handler)

    caplog.watch_uvicorn = watch_uvicorn
    yield caplog
    for logger, level in touched:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)


def lines(caplog, kind: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fastkv.serve" and f" {kind}" in r.getMessage()]


def ask(url: str, path: str, body) -> httpx.Response:
    """One request, its body read whole (a stream's events too)."""
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    with httpx.stream("POST", url + path, content=content, headers={"content-type": "application/json"},
                      timeout=60) as response:  # fmt: skip
        response.read()
    return response


# -- item 3: no path -------------------------------------------------------------------------------------
def test_a_shipped_profile_says_shipped_and_names_no_path():
    found = find("qwen2.5-0.5b")
    assert found is not None and found.origin == "shipped"
    assert found.source.startswith("profile qwen2.5-0.5b (shipped, calibrated ")
    assert "/" not in found.source and "\\" not in found.source and REPO not in found.source
    assert read(found.path).source == found.source  # read by its path: still known as shipped
    assert Path(found.path).is_file()  # the path stays, for local display


def test_a_users_profile_says_user(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKV_CACHE", str(tmp_path))
    path = user_path("qwen2.5-0.5b")
    path.parent.mkdir(parents=True)
    record = json.loads((shipped_dir() / "qwen2.5-0.5b.json").read_text()) | {"created": "2027-01-02"}
    record.pop("amended", None)  # what `fastkv calibrate` writes: a fresh calibration, amended by nobody
    path.write_text(json.dumps(record))
    found = find("qwen2.5-0.5b")
    assert found.origin == "user" and found.source == "profile qwen2.5-0.5b (user, calibrated 2027-01-02)"
    assert str(tmp_path) not in found.source
    # a profile named by a local model's path shows that model's folder name alone
    local = read(path)
    local.model = str(tmp_path / "models" / "mine")
    assert local.source == "profile mine (user, calibrated 2027-01-02)"


def test_nothing_a_client_gets_or_the_log_says_holds_a_path(profiled, server_log):
    server = ServerThread(profiled, "tiny", METHOD, kv_mib=64, max_batch=2, max_queue=4, prefix_cache_mib=8)
    try:
        server_log.watch_uvicorn()
        url = server.url
        answers = [
            ask(url, "/v1/completions", OK),
            ask(url, "/v1/chat/completions", CHAT),
            ask(url, "/v1/completions", {**OK, "stream": True}),
            ask(url, "/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
            ask(url, "/v1/completions", "not json"),
            ask(url, "/v1/completions", {**OK, "temperature": 9}),
            ask(url, "/v1/completions", {**OK, "fastkv": {"method": "fastkv(tsp_layer=99)"}}),
            ask(url, "/v1/completions", {**OK, "model": "other"}),
            ask(url, "/nope", "{}"),
            httpx.get(url + "/health"),
            httpx.get(url + "/v1/models"),
            httpx.get(url + "/metrics"),
        ]
    finally:
        server.close()
    assert [a.status_code for a in answers[:4]] == [200] * 4 and all(a.status_code >= 400 for a in answers[4:9])
    defaults = answers[0].json()["fastkv"]["defaults"]
    assert defaults.startswith("profile qwen2.5-0.5b (shipped, calibrated ")  # the profile is what is reported
    assert defaults in answers[2].text and defaults in answers[3].text  # and so in the streams' last chunks
    for answer in answers:
        seen = answer.text + "".join(f"{k}: {v}\n" for k, v in answer.headers.items())
        assert REPO not in seen and PACKAGE not in seen, (answer.request.url, seen[:500])
    said = [r.getMessage() for r in server_log.records]
    assert any(defaults in line for line in said)  # the startup line names the profile
    assert any("uvicorn" in r.name for r in server_log.records)  # uvicorn's lines were watched too
    for line in [*said, server_log.text]:
        assert REPO not in line and PACKAGE not in line, line[:500]


# -- item 4: ids -----------------------------------------------------------------------------------------
def serve_a_few(llm) -> list[tuple[str, str | None]]:
    """(x-request-id, the body's id or None) of a few requests to a new server, which then stops."""
    server = ServerThread(llm, "tiny", METHOD, kv_mib=64, max_batch=2, max_queue=4, prefix_cache_mib=0)
    found = []
    asked = [("/v1/completions", OK), ("/v1/chat/completions", CHAT), ("/v1/completions", OK),
             ("/v1/completions", {**OK, "stream": True}), ("/v1/completions", {**OK, "n": 2})]  # fmt: skip
    try:
        for path, body in asked:
            answer = ask(server.url, path, body)
            events = [json.loads(x[6:]) for x in answer.text.splitlines() if x.startswith("data: {")]
            ids = {e["id"] for e in events} if events else {answer.json().get("id")}
            assert len(ids) == 1, ids  # a stream's chunks share their response's id
            found.append((answer.headers["x-request-id"], ids.pop()))
        found.append((httpx.get(server.url + "/health").headers["x-request-id"], None))
    finally:
        server.close()
    return found


def test_ids_are_random_unique_and_find_their_requests_log_lines(profiled, server_log):
    first, second = serve_a_few(profiled), serve_a_few(profiled)
    requests = [rid for rid, _ in first + second]
    assert all(REQUEST_ID.fullmatch(rid) for rid in requests), requests
    assert len(set(requests)) == len(requests)  # within one server and across the two
    answered = [(rid, oid) for rid, oid in first + second if oid is not None]
    assert len(answered) == 8 and len({oid for _, oid in answered}) == 8
    for rid, oid in answered:  # the response's id has its request's digits: either finds the other
        assert re.fullmatch(r"(chatcmpl|cmpl)-[0-9a-f]{32}", oid) and oid.split("-")[1] == rid[4:]
    done = lines(server_log, "done:")
    for rid, _ in answered:
        assert sum(line.startswith(f"{rid} done: ") for line in done) == 1, (rid, done)
    refused = lines(server_log, "refused:")
    assert all(any(line.startswith(f"{rid} refused: status=400") for line in refused) for rid, oid in
               (first[4], second[4]))  # fmt: skip


def test_request_ids_differ_across_restarts():
    """A fresh process (a restart, another replica) does not repeat the ids another one gave."""
    code = "from fastkv.serve.api import request_id; print(request_id(), request_id())"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]  # fmt: skip
    assert len({*runs[0], *runs[1]}) == 4 and all(REQUEST_ID.fullmatch(r) for r in runs[0] + runs[1])


# -- item 9: the log -------------------------------------------------------------------------------------
def test_the_startup_line_names_model_method_defaults_precision_and_bounds(profiled, server_log):
    server = ServerThread(profiled, "tiny", METHOD, kv_mib=48, max_batch=3, max_queue=5, prefix_cache_mib=8,
                          prefill_chunk=64)  # fmt: skip
    server.close()
    started = lines(server_log, "model=")
    assert len(started) == 1, started
    line = started[0]
    method, source = profiled.resolve(METHOD)
    assert line.startswith("serving model='tiny' ") and f"method={format_spec(method)!r}" in line
    assert f"fastkv_defaults={source!r}" in line and f"precision={profiled.precision}" in line
    assert "kv_mib=48 prefix_store_mib=8 max_batch=3 max_queue=5 max_prompt_tokens=4096 prefill_chunk=64" in line


def test_every_request_logs_one_line_as_it_ends(profiled, server_log):
    server = ServerThread(profiled, "tiny", METHOD, kv_mib=64, max_batch=2, max_queue=4, prefix_cache_mib=0)
    try:
        whole = ask(server.url, "/v1/completions", {**OK, "max_tokens": 4, "ignore_eos": True})
        streamed = ask(server.url, "/v1/chat/completions", {**CHAT, "stream": True})
        bad = ask(server.url, "/v1/completions", {**OK, "temperature": 9})
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                          json={**OK, "max_tokens": 400, "ignore_eos": True, "stream": True}) as gone:  # fmt: skip
            next(gone.iter_lines())  # then hang up
        deadline = time.time() + 10
        while not lines(server_log, "cancelled:") and time.time() < deadline:
            time.sleep(0.05)
    finally:
        server.close()
    usage = whole.json()["usage"]
    rid = whole.headers["x-request-id"]
    [line] = [x for x in lines(server_log, "done:") if x.startswith(rid)]
    assert f"prompt_tokens={usage['prompt_tokens']} prefix_reused=0 " in line and "new_tokens=4 " in line
    assert "finish=length " in line and re.search(r"prefill_s=\d+\.\d{3} ", line)
    assert re.search(r"decode_tok_s=(\d+\.\d|-)$", line)
    assert any(x.startswith(streamed.headers["x-request-id"] + " done: finish=") for x in lines(server_log, "done:"))
    assert f"{bad.headers['x-request-id']} refused: status=400 code=invalid_value param='temperature'" in lines(
        server_log, "refused:"
    )
    assert [x.split()[0] for x in lines(server_log, "cancelled:")] == [gone.headers["x-request-id"]]
    assert len(lines(server_log, "done:")) == 2


def test_fastkv_serve_prints_the_lines_as_uvicorn_prints_its_own(tiny_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "fastkv", "serve", "--model", str(tiny_dir), "--dtype", "float32", "--quantize",
           "none", "--method", "snapkv(budget=64)", "--port", str(port), "--kv-mib", "64",
           "--prefix-cache-mib", "0", "--shutdown-timeout", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ})
    said: list[str] = []

    def read_stderr() -> None:
        for line in proc.stderr:
            said.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while not any("Uvicorn running on" in x for x in said) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        answer = httpx.post(url + "/v1/completions", json={**OK, "model": str(tiny_dir)}, timeout=60)
        assert answer.status_code == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(said)
    started = r"^INFO: +serving model='[^']+' method=[\"']snapkv\(budget=64.*kv_mib=64 "  # uvicorn's "INFO:" prefix
    assert re.search(started, text, re.M), text[-3000:]
    rid = answer.headers["x-request-id"]
    assert re.search(rf"^INFO: +{rid} done: finish=\w+ prompt_tokens=\d+ ", text, re.M), text[-3000:]
