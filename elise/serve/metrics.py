"""Prometheus metrics of one server (its own registry, served at ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("elise_requests", "speech requests by outcome", ["status"], registry=r)
        self.errors = Counter("elise_errors", "error responses by HTTP status", ["code"], registry=r)
        self.queue_depth = Gauge("elise_queue_depth", "requests waiting for a batch row", registry=r)
        self.active = Gauge("elise_active_sequences", "sequences in the running batch", registry=r)
        self.batch_size = Histogram("elise_batch_size", "sequences per decode step", buckets=BATCH_BUCKETS,
                                    registry=r)  # fmt: skip
        self.max_batch_seen = Gauge("elise_batch_size_max", "largest batch stepped so far", registry=r)
        self.ttfb = Histogram("elise_time_to_first_audio_seconds", "submit to first audio chunk",
                              buckets=TIME_BUCKETS, registry=r)  # fmt: skip
        self.rtf = Histogram("elise_rtf", "generation seconds per audio second, per request",
                             buckets=TIME_BUCKETS, registry=r)  # fmt: skip
        self.audio_seconds = Counter("elise_audio_seconds", "audio seconds generated", registry=r)
        self.worker_seconds = Counter("elise_worker_seconds", "model worker time by phase (prefill: admitted "
                                      "prompts, frame: decode steps, decode: codec)", ["phase"], registry=r)  # fmt: skip
        self.largest = 0

    def step(self, n: int) -> None:
        """One decode step over ``n`` sequences (called by the model worker)."""
        self.batch_size.observe(n)
        if n > self.largest:
            self.largest = n
            self.max_batch_seen.set(n)

    def worker_time(self, seconds: dict[str, float]) -> None:
        """One frame boundary's seconds by phase (called by the model worker)."""
        for phase, dt in seconds.items():
            self.worker_seconds.labels(phase).inc(dt)

    def render(self) -> bytes:
        return generate_latest(self.registry)
