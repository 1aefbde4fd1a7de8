"""`fastkv serve`: the OpenAI-compatible server, in this process or as Ray Serve replicas."""

from __future__ import annotations

import typer

from ..console import err, fail, load_llm
from ..methods import parse
from ..models import DEFAULT_MODEL, DTYPE_HELP
from ..quantize import QUANTIZE_HELP
from .common import COMPILE_HELP, MODEL_HELP


def serve(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help=MODEL_HELP),
    method: str = typer.Option("fastkv", "--method", help="the default method spec of requests"),
    host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(8000),
    kv_mib: float = typer.Option(2048, help="memory for the decode batch's KV caches and stored prefixes, MiB"),
    prefix_cache_mib: float = typer.Option(
        1024, help="most memory for stored prefixes (follow-ups on a prompt reuse its prefill), MiB; 0: none"
    ),
    max_batch: int = typer.Option(16, help="most requests decoding at once"),
    prefill_chunk: int = typer.Option(
        256, help="prefill this many prompt tokens at a time, with decode steps of running streams between; 0: whole"
    ),
    prefill_budget: int = typer.Option(8192, help="most tokens of prefill work between two decode steps"),
    prefill_share: float = typer.Option(
        1.0, help="most prefill time between two decode steps, in decode steps' time (0: --prefill-budget alone)"
    ),
    max_queue: int = typer.Option(64, help="most requests waiting; more get 429"),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    quantize: str = typer.Option("auto", help=QUANTIZE_HELP),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    ray: bool = typer.Option(False, "--ray", help="serve as Ray Serve replicas (the ray extra)", rich_help_panel="Ray"),
    replicas: int = typer.Option(1, help="with --ray: replicas, each with its own model", rich_help_panel="Ray"),
    min_replicas: int | None = typer.Option(None, help="with --ray: autoscale from this many", rich_help_panel="Ray"),
    max_replicas: int | None = typer.Option(None, help="with --ray: autoscale up to this many", rich_help_panel="Ray"),
    target_ongoing: float = typer.Option(
        4, help="with --ray and autoscaling: requests in flight per replica to aim at", rich_help_panel="Ray"
    ),
    replica_cpus: float = typer.Option(1, help="with --ray: CPUs per replica (its threads)", rich_help_panel="Ray"),
    replica_gpus: float = typer.Option(0, help="with --ray: GPUs per replica", rich_help_panel="Ray"),
    ray_address: str | None = typer.Option(
        None,
        help="with --ray: the cluster to join ('auto', ray://head:10001); default: start one here",
        rich_help_panel="Ray",
    ),
    api_key: str | None = typer.Option(
        None,
        envvar="FASTKV_API_KEY",
        help="require Authorization: Bearer KEY (also FASTKV_API_KEY)",
        rich_help_panel="Access",
    ),  # fmt: skip
    allowed_host: list[str] = typer.Option(
        [],
        help="a Host header to accept (repeatable); loopback binds accept only loopback names by default",
        rich_help_panel="Access",
    ),  # fmt: skip
    max_body_mb: float = typer.Option(8, help="largest request body, MB", rich_help_panel="Limits"),
    max_prompt_tokens: int | None = typer.Option(
        None, help="longest prompt (default: the model's context)", rich_help_panel="Limits"
    ),
    header_timeout: float = typer.Option(
        10, help="seconds a connection has to send a request head", rich_help_panel="Limits"
    ),
    keep_alive: float = typer.Option(5, help="seconds an idle connection stays open", rich_help_panel="Limits"),
    max_connections: int = typer.Option(256, help="most connections at once (more get 503)", rich_help_panel="Limits"),
    shutdown_timeout: float = typer.Option(
        30, help="at SIGTERM, seconds running requests get to finish", rich_help_panel="Limits"
    ),
) -> None:
    """An OpenAI-compatible server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

    With --ray: the same app as Ray Serve replicas behind one endpoint (see README, "Scaling out").
    """
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"fastkv serve needs the serve extra: pip install 'fastkv[serve]' (missing: {', '.join(missing)})")
    for option, value in (("--kv-mib", kv_mib), ("--max-batch", max_batch), ("--max-queue", max_queue)):
        if value <= 0:
            fail(f"{option} must be positive, got {value}")
    if prefix_cache_mib < 0:
        fail(f"--prefix-cache-mib must be >= 0, got {prefix_cache_mib}")
    if prefill_chunk < 0:
        fail(f"--prefill-chunk must be >= 0 (0: whole prefills), got {prefill_chunk}")
    chunk = prefill_chunk or None
    if prefill_share < 0:
        fail(f"--prefill-share must be >= 0 (0: the token budget alone), got {prefill_share}")
    bounds = {"--prefill-budget": prefill_budget, "--max-body-mb": max_body_mb, "--header-timeout": header_timeout,
              "--keep-alive": keep_alive,
              "--max-connections": max_connections, "--shutdown-timeout": shutdown_timeout,
              "--max-prompt-tokens": 1 if max_prompt_tokens is None else max_prompt_tokens}  # fmt: skip
    for option, value in bounds.items():
        if value <= 0:
            fail(f"{option} must be positive, got {value}")
    from ..serve.api import LOOPBACK_HOSTS, ServeLimits, create_app

    hosts = {h.lower() for h in allowed_host}
    if host in ("127.0.0.1", "localhost", "::1"):
        hosts |= LOOPBACK_HOSTS  # a web page cannot drive a loopback server through DNS rebinding
    limits = ServeLimits(int(max_body_mb * 1e6), max_prompt_tokens, api_key or None, frozenset(hosts) or None)
    if ray:
        from ..serve.ray_app import ReplicaOptions, Scaling

        options = ReplicaOptions(model, method, dtype, device, kv_mib, max_batch, max_queue, compile, quantize=quantize,
                                 prefix_cache_mib=prefix_cache_mib, limits=limits, prefill_chunk=chunk,
                                 prefill_budget=prefill_budget, prefill_share=prefill_share)  # fmt: skip
        scaling = Scaling(replicas, min_replicas, max_replicas, target_ongoing, replica_cpus, replica_gpus)
        serve_on_ray(options, scaling, host, port, ray_address)
        return
    from ..serve.http import Connections, logging_config, server

    llm = load_llm(model, dtype, device, quantize)
    try:
        application = create_app(llm, model, method, kv_mib, max_batch, max_queue, compile=compile,
                                 prefix_cache_mib=prefix_cache_mib, limits=limits, shutdown_timeout=shutdown_timeout,
                                 prefill_chunk=chunk, prefill_budget=prefill_budget,
                                 prefill_share=prefill_share)  # fmt: skip
    except ValueError as e:
        fail(f"--method: {e}")
    connections = Connections(header_timeout, keep_alive, max_connections, shutdown_timeout)
    # uvicorn's logging plus the server's own lines (its startup line, one per request), printed alike
    server(application, host, port, connections, log_config=logging_config()).run()


def serve_on_ray(options, scaling, host: str, port: int, address: str | None) -> None:
    """`fastkv serve --ray`: check what can be checked here, then deploy and block until Ctrl-C."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        fail("fastkv serve --ray needs Ray: pip install 'fastkv[ray]'")
    from ..serve.ray_app import start

    try:
        scaling.check()
        parse(options.method)  # a bad default method fails here, not in every replica
    except ValueError as e:
        fail(str(e))
    err.print(f"deploying {options.model} on Ray Serve at http://{host}:{port} (Ctrl-C stops)")
    start(options, scaling, host, port, address, blocking=True)
