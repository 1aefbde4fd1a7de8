"""`fastkv serve --ray`: the same OpenAI-compatible app, as replicas of a Ray Serve deployment.

Each replica is a Ray actor (its own process) that loads the model once and builds the app of
`fastkv.serve.api.create_app`, wrapped with `serve.ingress` (a builder, run inside the replica), with its
own scheduler, KV-aware admission and metrics. Ray Serve's proxy spreads requests over the replicas
(the replica with fewer requests in flight, of two chosen at random) and never sends one replica more
than `max_batch + max_queue` at once: beyond that, requests wait in the proxy for a free place instead of
meeting the replica's own 429. Streams pass through the proxy; a client that goes away has its request
cancelled in the replica's engine (Ray Serve cancels the handler, which frees the job).

/metrics, asked of any replica, gathers every live replica's figures (`DeploymentHandle.broadcast`) and
labels each series with `replica`. Ray is optional (`pip install 'fastkv[ray]'`); nothing else in fastkv
imports this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from .api import ServeLimits

APP, DEPLOYMENT = "fastkv", "fastkv"
# Ray Serve gives its HTTP proxy 5 s to start, three times. On a small machine busy with a model's
# prefill, importing the proxy takes longer, and Serve kills it over and over. A cluster started here
# (ray.init in this process) waits longer; an existing cluster keeps its own settings.
PATIENT_PROXY = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}


@dataclass(frozen=True)
class ReplicaOptions:
    """What every replica builds its app from (picklable: it travels to the replicas)."""

    model: str
    method: str = "fastkv"
    dtype: str = "auto"
    device: str = "cpu"
    kv_mib: float = 2048
    max_batch: int = 16
    max_queue: int = 64
    compile: bool = False
    threads: int | None = None  # torch threads per replica (default: its CPUs)
    quantize: str = "auto"
    prefix_cache_mib: float = 1024
    limits: ServeLimits = ServeLimits()  # what each replica's app checks (API key, hosts, sizes)
    proxy_queue: int | None = None  # requests that may wait in Ray's proxy for a replica (default max_queue)
    prefill_chunk: int | None = 256
    prefill_budget: int = 8192
    prefill_share: float = 1.0


@dataclass(frozen=True)
class Scaling:
    """How many replicas and what each gets: a fixed count, or autoscaling bounds."""

    replicas: int = 1
    min_replicas: int | None = None  # both bounds given: autoscale between them
    max_replicas: int | None = None
    target_ongoing: float = 4  # requests in flight per replica the autoscaler aims at
    cpus: float = 1
    gpus: float = 0

    def check(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be >= 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both --min-replicas and --max-replicas")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= --min-replicas <= --max-replicas: {self.min_replicas}, {self.max_replicas}")
        if self.cpus <= 0 or self.gpus < 0 or self.target_ongoing <= 0:
            raise ValueError("--replica-cpus and --target-ongoing must be positive, --replica-gpus >= 0")


class Replica:
    """The deployment class around the app; `metric_families` answers the broadcast behind /metrics."""

    def metric_families(self) -> tuple[str, list[Metric]]:
        return _REPLICA["name"], list(_REPLICA["metrics"].registry.collect())

    def identity(self) -> dict:
        """This replica's name and process id (operators and tests)."""
        return {"replica": _REPLICA["name"], "pid": os.getpid()}


_REPLICA: dict = {}  # this replica's name and Metrics (each replica is its own process)


def build_app(options: ReplicaOptions):
    """Runs inside each replica: load the model, build the app. The replica logs what `fastkv serve` logs
    (its startup line, one line per request) in the same format; Ray keeps a replica's output in its logs
    and shows it on the driver's console."""
    import logging.config

    import torch
    from ray import serve

    from ..llm import LLM
    from .api import create_app
    from .http import logging_config

    logging.config.dictConfig(logging_config(with_uvicorn=False))

    if options.threads:
        torch.set_num_threads(options.threads)
    name = serve.get_replica_context().replica_id.unique_id
    llm = LLM.load(options.model, dtype=options.dtype, device=options.device, progress=False, quantize=options.quantize)
    app = create_app(llm, options.model, options.method, options.kv_mib, options.max_batch, options.max_queue,
                     options.compile, replica=name, metrics_body=all_replicas_metrics,
                     prefix_cache_mib=options.prefix_cache_mib, limits=options.limits,
                     prefill_chunk=options.prefill_chunk, prefill_budget=options.prefill_budget,
                     prefill_share=options.prefill_share)  # fmt: skip
    _REPLICA.update(name=name, metrics=app.state.metrics)
    return app


async def all_replicas_metrics() -> bytes:
    """Every live replica's metrics, each series labelled with its replica; a replica that does not answer
    within 5 s is left out, and a comment line says how many answered."""
    from ray import serve

    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
    try:
        found = await handle.broadcast("metric_families").results_async(timeout_s=5, return_exceptions=True)
    except TimeoutError as e:  # the whole broadcast: report it rather than fail the scrape
        found = [e]
    answered = [f for f in found if not isinstance(f, BaseException)]
    missing = [f"{type(e).__name__}: {e}".splitlines()[0] for e in found if isinstance(e, BaseException)]
    note = f"# fastkv: {len(answered)} of {len(found)} replicas answered" + "".join(f"; {m}" for m in missing)
    return note.encode() + b"\n" + merged_metrics(answered)


def merged_metrics(per_replica: list[tuple[str, list[Metric]]]) -> bytes:
    """Prometheus text of several registries' families, one family per name, series labelled by replica."""
    families: dict[str, Metric] = {}
    for replica, collected in sorted(per_replica, key=lambda x: x[0]):
        for family in collected:
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]

    class Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


def application(options: ReplicaOptions, scaling: Scaling):
    """The Ray Serve application: `serve.run(application(...))`."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    scaling.check()
    config: dict = {
        "name": DEPLOYMENT,
        "max_ongoing_requests": options.max_batch + options.max_queue,
        # Beyond the replicas' rows and queues, a bounded wait in the proxy, then 429 with Retry-After.
        "max_queued_requests": options.max_queue if options.proxy_queue is None else options.proxy_queue,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=1),
        "ray_actor_options": {"num_cpus": scaling.cpus, "num_gpus": scaling.gpus},
        "health_check_period_s": 2,
    }
    if scaling.min_replicas is not None:
        config["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing,
        }
    else:
        config["num_replicas"] = scaling.replicas
    replica_options = replace(options, threads=options.threads or max(1, int(scaling.cpus)))

    def built():  # a plain function: Serve calls it with no arguments inside each replica
        return build_app(replica_options)

    return serve.deployment(**config)(serve.ingress(built)(Replica)).bind()


def start(options: ReplicaOptions, scaling: Scaling, host: str, port: int, address: str | None = None,
          blocking: bool = False):  # fmt: skip
    """Join (address) or start a Ray cluster, start Serve's proxy on host:port, deploy; a handle to it."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        for key, value in PATIENT_PROXY.items():
            os.environ.setdefault(key, value)
        # FASTKV_CACHE and friends: replicas find the same model cache as this process
        env = {k: v for k, v in os.environ.items() if k.startswith("FASTKV_")}
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": env})
    serve.start(http_options={"host": host, "port": port})
    return serve.run(application(options, scaling), name=APP, route_prefix="/", blocking=blocking)
