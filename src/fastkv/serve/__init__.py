"""`fastkv serve`: an OpenAI-compatible HTTP server over the ragged-batch engine (the `serve` extra)."""
