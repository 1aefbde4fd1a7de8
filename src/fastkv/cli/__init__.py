"""The `fastkv` command, one module per subcommand: generate, serve, models, methods, calibrate, demo, info, eval."""

from __future__ import annotations

import typer

from . import calibrate, demo, generate, info, methods, models, serve
from .eval import app as eval_app

# -h is --help on every command and subcommand (click's context settings are inherited by subcommands).
HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="FastKV: faster prefill and decoding for long prompts on HuggingFace models.",
    no_args_is_help=True,
    add_completion=False,
    context_settings=HELP,
)
app.command()(generate.generate)
app.command()(serve.serve)
app.command()(models.models)
app.command()(methods.methods)
app.command()(calibrate.calibrate)
app.command()(demo.demo)
app.command()(info.info)
app.add_typer(eval_app, name="eval")

if __name__ == "__main__":
    app()
