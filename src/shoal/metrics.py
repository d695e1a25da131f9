"""Prometheus metrics (prometheus-client), defined once. The gateway records requests and
connections; the model service records launches, evictions and crashes; gauges of queues and memory
are read at scrape.

Label values are bounded: a route is a route template (or "unmatched"), a model is the uid of a
model that exists, never a name a client sent."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "shoal_requests", "HTTP requests answered", ["route", "model", "status"], registry=REGISTRY
)
ERRORS = Counter(
    "shoal_request_errors",
    "HTTP requests answered with 4xx/5xx",
    ["route", "model", "status"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "shoal_request_seconds",
    "Time to answer (to the last byte)",
    ["route", "model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "shoal_time_to_first_token_seconds",
    "Streaming: request start to first token",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
TOKENS = Counter("shoal_tokens_generated", "Completion tokens generated", ["model"], registry=REGISTRY)
LAUNCHES = Counter(
    "shoal_launches", "Replica starts (launch, restore, restart)", ["model"], registry=REGISTRY
)
EVICTIONS = Counter("shoal_evictions", "Replicas evicted to make room", ["model"], registry=REGISTRY)
CRASHES = Counter("shoal_crashes", "Runner processes that died unasked", ["model"], registry=REGISTRY)
HUNG = Counter(
    "shoal_runners_hung", "Runners killed for not answering liveness pings", ["model"], registry=REGISTRY
)
SUPERVISOR_ERRORS = Counter(
    "shoal_supervisor_errors", "Supervisor steps that raised (the loop went on)", ["step"], registry=REGISTRY
)
OPEN_CONNECTIONS = Gauge("shoal_open_connections", "Client connections open now", registry=REGISTRY)
CONNECTIONS_REFUSED = Counter(
    "shoal_connections_refused",
    "Connections answered 503 at a connection cap (reason: per_client or total)",
    ["reason"],
    registry=REGISTRY,
)
SLOW_CLIENTS = Counter(
    "shoal_slow_client_timeouts",
    "Connections closed for sending too slowly (phase: headers or body)",
    ["phase"],
    registry=REGISTRY,
)
PARKS = Counter(
    "shoal_parks",
    "Replicas parked (weights to host RAM, process kept) to make room",
    ["model"],
    registry=REGISTRY,
)
MOVES = Counter(
    "shoal_moves",
    "Replicas moved to another GPU to make room (defragmentation)",
    ["model"],
    registry=REGISTRY,
)
WAKE_SECONDS = Histogram(
    "shoal_wake_seconds",
    "A parked replica's wake: from the request that woke it to ready (how: same_process or new_runner)",
    ["model", "how"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
PARKED_REPLICAS = Gauge("shoal_parked_replicas", "Replicas parked now", registry=REGISTRY)


class RequestMetrics:
    """REQUESTS, LATENCY and ERRORS for one (route, model, status): labels() takes a lock and builds
    a key on every call, so each label set's children are looked up once and kept (the label sets
    are bounded, see above)."""

    __slots__ = ("errors", "latency", "requests")
    _known: dict[tuple[str, str, int], RequestMetrics] = {}

    def __init__(self, route: str, model: str, status: int) -> None:
        self.requests = REQUESTS.labels(route, model, str(status))
        self.latency = LATENCY.labels(route, model)
        self.errors = ERRORS.labels(route, model, str(status)) if status >= 400 else None

    @classmethod
    def record(cls, route: str, model: str, status: int, seconds: float) -> None:
        key = (route, model, status)
        found = cls._known.get(key)
        if found is None:
            found = cls._known[key] = cls(route, model, status)
        found.requests.inc()
        found.latency.observe(seconds)
        if found.errors is not None:
            found.errors.inc()


def forget_model(uid: str) -> None:
    """Remove every series labelled with model `uid` (a terminated model), so that the label sets
    stay those of models that exist. Launched again, its counters start anew (a counter reset, which
    Prometheus' rate() handles)."""
    for metric in (REQUESTS, ERRORS, LATENCY, TIME_TO_FIRST_TOKEN, TOKENS, LAUNCHES, EVICTIONS, CRASHES,
                   HUNG, PARKS, MOVES, WAKE_SECONDS):  # fmt: skip
        names = metric._labelnames  # prometheus_client has no public accessor
        found = {
            tuple(sample.labels[n] for n in names)
            for family in metric.collect()
            for sample in family.samples
            if sample.labels.get("model") == uid
        }
        for labels in found:
            metric.remove(*labels)
    for key in [k for k in RequestMetrics._known if k[1] == uid]:
        del RequestMetrics._known[key]
