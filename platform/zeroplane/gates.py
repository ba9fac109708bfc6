"""Canary gates: the evidence a release decides on, and the decision.

Evidence per served version comes from the replicas' own series (:mod:`zeroplane.runtime.serve.metrics`)
as Ray's metrics agents export them: the cumulative request and error counters and the latency
histogram, summed over replicas. A *window* is the difference of two readings; its p95 latency is read
from the histogram's bucket counts the way Prometheus' ``histogram_quantile`` does (linear inside the
bucket the quantile falls in). Counters restart with a replica; a negative difference counts as 0.

The decision (:func:`decide`) for one window of the canary against the stable version:

* ``rollback`` when the canary's error rate is above ``max_error_rate``, or its p95 latency is above
  ``max_p95_latency_ratio`` × the stable version's (only when both answered ``min_requests``);
* ``wait`` when the canary answered fewer than ``min_requests`` (too little evidence either way);
* ``advance`` otherwise.

The held-out evaluation (:func:`bits_per_byte`) compares two versions on the same text in bits per
byte — the summed next-token loss over the text's UTF-8 bytes — which, unlike the per-token loss,
does not depend on the tokenizer, so versions trained with different tokenizers compare fairly.

No ray imports; torch/transformers only inside :func:`bits_per_byte`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from . import names

LATENCY_SERIES = "zeroplane_request_latency_seconds"


@dataclass
class Window:
    """What one version answered in a window.

    Attributes:
        requests: requests answered.
        errors: of those, answered with status >= 400.
        buckets: ``{upper bound in s: cumulative count}`` of the latency histogram (``inf`` included).
    """

    requests: float = 0.0
    errors: float = 0.0
    buckets: Optional[Dict[float, float]] = None

    @property
    def error_rate(self) -> Optional[float]:
        """errors / requests, None without requests."""
        return self.errors / self.requests if self.requests > 0 else None

    def p95_s(self) -> Optional[float]:
        """The 95th percentile latency in seconds (:func:`quantile`), None without observations."""
        return quantile(0.95, self.buckets or {})

    def to_dict(self) -> Dict[str, Any]:
        """``{"requests", "errors", "error_rate", "p95_s"}``."""
        return {"requests": self.requests, "errors": self.errors, "error_rate": self.error_rate, "p95_s": self.p95_s()}


def quantile(q: float, buckets: Mapping[float, float]) -> Optional[float]:
    """The ``q`` quantile of a cumulative histogram ``{upper bound: count}``, as Prometheus'
    ``histogram_quantile``: linear interpolation inside the bucket where rank ``q * total`` falls; the
    lower bound of the first bucket is 0; a rank in the ``+Inf`` bucket gives the largest finite bound.

    Returns:
        Seconds, or None when the histogram is empty.
    """
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return prev_bound
            if count == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = b, count
    return prev_bound


def parse_samples(text: str) -> Dict[Tuple[str, str], Window]:
    """Cumulative :class:`Window` per ``(model, version)`` from one Prometheus text page (Ray's metrics
    agent prefixes names with ``ray_``; every replica's series are summed)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Dict[Tuple[str, str], Window] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            model, version = s.labels.get("model"), s.labels.get("version")
            if not model or not version:
                continue
            w = out.setdefault((model, version), Window(buckets={}))
            if s.name.endswith(names.METRIC_REQUESTS):
                w.requests += s.value
            elif s.name.endswith(names.METRIC_ERRORS):
                w.errors += s.value
            elif s.name.endswith(LATENCY_SERIES + "_bucket") and "le" in s.labels:
                le = float("inf") if s.labels["le"] in ("+Inf", "inf") else float(s.labels["le"])
                w.buckets[le] = w.buckets.get(le, 0.0) + s.value
    return out


def merge(pages: Iterable[Dict[Tuple[str, str], Window]]) -> Dict[Tuple[str, str], Window]:
    """Sum readings of several nodes' pages."""
    out: Dict[Tuple[str, str], Window] = {}
    for page in pages:
        for key, w in page.items():
            m = out.setdefault(key, Window(buckets={}))
            m.requests += w.requests
            m.errors += w.errors
            for b, c in (w.buckets or {}).items():
                m.buckets[b] = m.buckets.get(b, 0.0) + c
    return out


def difference(end: Window, start: Optional[Window]) -> Window:
    """``end - start`` (a reading taken later minus one taken earlier), negative parts as 0."""
    start = start or Window(buckets={})
    buckets = {b: max(0.0, c - (start.buckets or {}).get(b, 0.0)) for b, c in (end.buckets or {}).items()}
    return Window(max(0.0, end.requests - start.requests), max(0.0, end.errors - start.errors), buckets)


@dataclass
class GatePolicy:
    """Thresholds of :func:`decide` (the spec's ``serve.release`` section; defaults there)."""

    max_error_rate: float
    max_p95_latency_ratio: float
    min_requests: int


def decide(policy: GatePolicy, stable: Window, canary: Window) -> Tuple[str, str]:
    """``("advance" | "wait" | "rollback", reason with the numbers)`` for one window (module docstring)."""
    c_rate = canary.error_rate
    if canary.requests < policy.min_requests:
        return "wait", f"canary answered {canary.requests:g} requests (< min_requests {policy.min_requests})"
    if c_rate is not None and c_rate > policy.max_error_rate:
        return "rollback", (f"canary error rate {c_rate:.3f} ({canary.errors:g}/{canary.requests:g}) > "
                            f"max_error_rate {policy.max_error_rate:g}")
    c_p95, s_p95 = canary.p95_s(), stable.p95_s()
    if c_p95 is not None and s_p95 and stable.requests >= policy.min_requests:
        ratio = c_p95 / s_p95
        if ratio > policy.max_p95_latency_ratio:
            return "rollback", (f"canary p95 {c_p95 * 1000:.0f} ms = {ratio:.2f}x stable's {s_p95 * 1000:.0f} ms "
                                f"> max_p95_latency_ratio {policy.max_p95_latency_ratio:g}")
    p95 = "-" if c_p95 is None else f"{c_p95 * 1000:.0f} ms"
    return "advance", (f"canary error rate {c_rate or 0:.3f} over {canary.requests:g} requests, p95 {p95} "
                       f"(stable {'-' if s_p95 is None else f'{s_p95 * 1000:.0f} ms'})")


def bits_per_byte(model_dir: str, texts: List[str], max_tokens: int = 256) -> float:
    """Bits per UTF-8 byte of ``texts`` under the causal LM in ``model_dir`` (lower is better).

    Each text is tokenized by the model's own tokenizer and cut into windows of at most ``max_tokens``
    (and the model's context); the summed cross-entropy of every predicted token (nats) is divided by
    ln 2 and by the bytes those tokens cover. Bits per byte is the tokenizer-independent form of
    perplexity (used by e.g. the Pile and Gao et al. 2020 for exactly this comparison).

    Raises:
        ValueError: no text to evaluate.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None) or max_tokens
    width = max(2, min(max_tokens, int(ctx)))
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for i in range(0, max(0, len(ids) - 1), width - 1):
                chunk = ids[i:i + width]
                if len(chunk) < 2:
                    break
                x = torch.tensor([chunk])
                logits = model(input_ids=x).logits[0, :-1].float()
                nats += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
                nbytes += len(tok.decode(chunk[1:]).encode("utf-8"))
    if nbytes == 0:
        raise ValueError("no held-out text to evaluate (every text is shorter than two tokens)")
    return nats / math.log(2) / nbytes
