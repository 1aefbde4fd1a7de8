"""`python -m fastkv ...`: the same as the `fastkv` command."""

from .cli import app

app()
