"""run.json: how an evaluation directory was made: its commands, package versions, machine and time spent."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def versions() -> dict[str, str]:
    found = {}
    for name in ("fastkv", "torch", "transformers", "gguf", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
    }


def command_line() -> str:
    """This process's command as a user would type it: the program by its name, not its installed path
    (which would put this machine's file system into a committed record)."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def update_record(out: Path, config: dict, started: float | None, new_command: bool) -> None:
    """Write run.json. A run records its command when it starts (so that a stopped run still says how it
    was made) and adds its duration when it ends; `started` None rebuilds it without adding time."""
    previous = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    now = time.time()
    commands = previous.get("commands", [])
    record = {
        # every invocation that added to this directory, in order (a resume with more methods adds one)
        "commands": [*commands, command_line()] if new_command or not commands else commands,
        "config": config,
        "versions": versions(),
        "machine": machine(),
        "started": previous.get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started or now))),
        "duration_s": previous.get("duration_s", 0.0) + (0 if new_command else now - (started or now)),
    }
    (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
