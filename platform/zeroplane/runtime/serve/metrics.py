"""Per-replica request metrics, tagged ``model`` and ``version``.

Each series is declared once (:data:`SERIES`) and every observation goes through one call,
:meth:`Metrics.observe`, which writes it to both sinks: :mod:`ray.serve.metrics` (exported by Ray's metrics
agent on each node with the ``ray_`` prefix and Serve's deployment/replica/application tags; what
``zeroplane serve status`` sums) and a private ``prometheus_client`` registry that ``GET /metrics`` renders
(this replica only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from zeroplane import names

logger = logging.getLogger("ray.serve")

#: Latency histogram bucket bounds, in seconds.
BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class Series:
    """One metric: ``kind`` ``"counter"`` or ``"histogram"``, its full name (counters end in ``_total``), help
    text and the tag keys beyond ``model`` and ``version``."""

    key: str
    kind: str
    name: str
    description: str
    tags: tuple[str, ...] = ()


#: Every series a replica records (``zeroplane_`` prefix). Generated tokens/s of a version is
#: ``rate(generated_tokens_total) / rate(generation_seconds_total)``.
SERIES = (
    Series("requests", "counter", names.METRIC_REQUESTS, "Requests answered.", ("route", "status")),
    Series("errors", "counter", names.METRIC_ERRORS, "Requests answered with status >= 400.", ("route", "status")),
    Series("latency", "histogram", "zeroplane_request_latency_seconds",
           "Request latency in seconds (arrival to the last byte generated).", ("route",)),
    Series("tokens", "counter", "zeroplane_generated_tokens_total", "Tokens generated."),
    Series("gen_s", "counter", "zeroplane_generation_seconds_total",
           "Seconds spent in requests that generated tokens."),
)


class Metrics:
    """The series of :data:`SERIES` for one served version, in both sinks (see the module docstring).

    Args:
        model: model name (tag ``model``).
        version: version, e.g. ``"v1"`` (tag ``version``).
    """

    def __init__(self, model: str, version: str) -> None:
        import prometheus_client as prom
        from ray.serve import metrics as serve_metrics

        self._tags = {"model": model, "version": version}
        self.registry = prom.CollectorRegistry()
        self._sinks: dict[str, tuple[str, Any, Any]] = {}
        for s in SERIES:
            keys = ("model", "version") + s.tags
            if s.kind == "counter":
                # prometheus_client appends "_total" to a counter's name itself.
                local = prom.Counter(s.name.removesuffix("_total"), s.description, keys, registry=self.registry)
                ray_metric = serve_metrics.Counter(s.name, description=s.description, tag_keys=keys)
            else:
                local = prom.Histogram(s.name, s.description, keys, buckets=BUCKETS_S, registry=self.registry)
                ray_metric = serve_metrics.Histogram(s.name, description=s.description, boundaries=list(BUCKETS_S),
                                                     tag_keys=keys)
            self._sinks[s.key] = (s.kind, local, ray_metric)

    def _record(self, key: str, value: float, **tags: str) -> None:
        kind, local, ray_metric = self._sinks[key]
        all_tags = {**self._tags, **tags}
        if kind == "histogram":
            local.labels(**all_tags).observe(value)
            ray_metric.observe(value, tags=all_tags)
        else:
            local.labels(**all_tags).inc(value)
            ray_metric.inc(value, tags=all_tags)

    def observe(self, route: str, status: int, latency_s: float, tokens: int = 0) -> None:
        """Record one answered request: ``latency_s`` seconds, ``tokens`` generated over all its choices.

        Status 499 is a client that went away before the answer was complete. Never raises: a failing
        metrics sink is logged, not passed on to the request."""
        try:
            self._record("requests", 1, route=route, status=str(status))
            if status >= 400:
                self._record("errors", 1, route=route, status=str(status))
            self._record("latency", latency_s, route=route)
            if tokens:
                self._record("tokens", tokens)
                self._record("gen_s", latency_s)
        except Exception as e:  # noqa: BLE001 - metrics must never fail a request
            logger.warning("recording metrics failed: %s", e)

    def render(self) -> bytes:
        """This replica's series in Prometheus text format (version 0.0.4)."""
        import prometheus_client as prom

        return prom.generate_latest(self.registry)
