"""Every code block of the README runs as written, so that the README cannot rot.

The blocks run in order, as a newcomer runs them: each shell block in bash and each Python block in a fresh
interpreter, from a scratch folder that holds the clone's files (links to them), with `.venv/bin` first on
PATH (the quick start activates it). Blocks fenced as `text` are not code (the spec grammar, the source
tree). Three kinds of line are handled apart, each for a stated reason:
- `bash scripts/setup.sh`: CI runs that very line before the tests (`.ci/run`), and a test cannot rerun
  the installation it runs in;
- `python -m pytest -q`: the command that runs this test;
- `fastkv serve ...`: a server, started in the background until it is ready (`/health` answers 200); the
  next Python block (the client) runs against it, then SIGTERM stops it, and it must exit cleanly;
- `fastkv demo`: `tests/test_real_model.py::test_cli_generate_and_demo` runs the same command at 1K tokens
  and checks its table (every method finds the passkey). As written (4K tokens) it is three 4K prefills
  alone, three to five minutes of CI's 30 on two cores, for nothing that test does not check.
Each command must exit 0 and print no traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fastkv.models import MODELS, part_paths

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
CI_RUNS = ("bash scripts/setup.sh", "python -m pytest -q")
ELSEWHERE = ("fastkv demo",)  # run by tests/test_real_model.py (see above)
TIMEOUT = 900  # seconds for one command (the first load of a model converts it)

pytestmark = pytest.mark.slow


def blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the README, in order."""
    return [(lang or "", code) for lang, code in FENCE.findall(README.read_text())]


def commands(code: str) -> list[str]:
    """The commands of a shell block: its lines without comments and blank lines."""
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in code.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_every_block_is_shell_python_or_text():
    langs = {lang for lang, _ in blocks()}
    assert langs <= {"bash", "python", "text"}, langs
    assert {"bash", "python"} <= langs
    ci = (ROOT / ".ci" / "run").read_text()
    for line in CI_RUNS:  # what this test leaves to CI, CI does run, as the README writes it
        assert line in ci, line


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch folder holding the clone's files, so what the README reads is there and what it writes
    (answers, runs) stays out of the clone."""
    if part_paths(MODELS["qwen2.5-0.5b"]) is None:
        if os.environ.get("FASTKV_REQUIRE_MODELS") == "1":
            raise RuntimeError("qwen2.5-0.5b is not installed")
        pytest.skip("qwen2.5-0.5b is not installed")
    if not (ROOT / ".venv" / "bin" / "fastkv").exists():
        pytest.skip("no .venv in the clone: the README's commands run from it (bash scripts/setup.sh)")
    work = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name not in {".git", "runs", "answers.jsonl"}:
            (work / entry.name).symlink_to(entry)
    return work


def environment() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    return env


def check(run: subprocess.CompletedProcess, what: str) -> None:
    assert run.returncode == 0, (
        f"{what}\nexit {run.returncode}\nstdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-3000:]}"
    )
    assert "Traceback" not in run.stderr, f"{what}\n{run.stderr[-3000:]}"


def run_shell(line: str, cwd: Path) -> subprocess.CompletedProcess:
    run = subprocess.run(["bash", "-c", f"set -eo pipefail; source .venv/bin/activate; {line}"], cwd=cwd,
                         env=environment(), capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    check(run, line)
    return run


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    run = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", code], cwd=cwd, env=environment(),
                         capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    check(run, code)
    return run


def start_server(line: str, cwd: Path) -> subprocess.Popen:
    server = subprocess.Popen(["bash", "-c", f"source .venv/bin/activate; exec {line}"], cwd=cwd, env=environment(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"{line} exited {server.returncode}:\n{server.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=2) as answer:
                if answer.status == 200 and json.loads(answer.read())["status"] == "ok":
                    return server
        except OSError:
            pass
        time.sleep(1)
    server.kill()
    raise AssertionError(f"{line} was not ready in {TIMEOUT} s")


def stop_server(server: subprocess.Popen, line: str) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        _, stderr = server.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        raise AssertionError(f"{line} did not stop within 60 s of SIGTERM") from None
    assert server.returncode == 0, f"{line} exited {server.returncode} on SIGTERM:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]


def test_every_code_block_runs_as_written(workdir):
    ran, server, serving = [], None, ""
    took = []  # (seconds, what): where the test's time goes, printed at its end
    for lang, code in blocks():
        start = time.perf_counter()
        if lang == "text":
            continue
        if lang == "python":
            out = run_python(code, workdir)
            assert out.stdout.strip(), f"the block printed nothing:\n{code}"
            ran.append(code.splitlines()[0])
            took.append((time.perf_counter() - start, f"python block {code.splitlines()[0]!r}"))
            if server is not None:  # the client block of a server started just before
                stop_server(server, serving)
                server = None
            continue
        for line in commands(code):
            if line in CI_RUNS or line in ELSEWHERE:
                continue
            begun = time.perf_counter()
            if line.startswith("fastkv serve"):
                server, serving = start_server(line, workdir), line
            else:
                run_shell(line, workdir)
            ran.append(line)
            took.append((time.perf_counter() - begun, line))
    assert server is None, f"{serving} was started but no Python block followed it"
    assert any("serve" in line for line in ran)
    assert (workdir / "answers.jsonl").is_file() and (workdir / "runs" / "ruler-quick" / "predictions.jsonl").is_file()
    print(f"{len(ran)} commands and blocks ran:", file=sys.stderr)
    for seconds, what in took:
        print(f"  {seconds:6.1f} s  {what[:90]}", file=sys.stderr)
