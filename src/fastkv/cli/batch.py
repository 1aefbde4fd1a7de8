"""`fastkv generate --batch prompts.jsonl`: many prompts decoded as one ragged batch, results as JSONL."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..console import err


def read_prompts(path: Path) -> list[dict]:
    """The lines of a JSONL file, each an object with a string "prompt" (and an optional "id")."""
    if not path.is_file():
        raise ValueError(f"batch file {path} does not exist")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ValueError(f'{path}:{number}: expected an object with a non-empty string "prompt"')
        rows.append(row)
    if not rows:
        raise ValueError(f"batch file {path} holds no prompts")
    return rows


def run_batch(llm, method, rows: list[dict], out_path: Path | None, sampling, **options) -> None:
    """Generate for every row and write one JSON line per row, in input order, as soon as it can."""
    sink = open(out_path, "w") if out_path else sys.stdout  # noqa: SIM115 (stdout is not ours to close)
    done: dict[int, dict] = {}
    written = 0
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    )
    task = progress.add_task("sequences done", total=len(rows))

    def on_result(index: int, result) -> None:
        nonlocal written
        s = result.stats
        done[index] = {
            "id": rows[index].get("id", index),
            "text": result.text,
            "finish_reason": result.finish_reason,
            "prompt_tokens": s.prompt_tokens,
            "new_tokens": s.new_tokens,
            "prefill_s": round(s.prefill_seconds, 3),
            "decode_s": round(s.decode_seconds, 3),
            "kv_ratio": round(s.kv_ratio, 4),
            "method": s.method,
        }
        progress.advance(task)
        while written in done:  # in input order: write the finished prefix
            sink.write(json.dumps(done.pop(written)) + "\n")
            sink.flush()
            written += 1

    try:
        with progress:
            llm.generate([r["prompt"] for r in rows], method, sampling, on_result=on_result, **options)
    finally:
        if out_path:
            sink.close()
