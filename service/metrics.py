"""Prometheus metrics. Each app (and each worker) has its own registry, so tests can run several.

Serving metrics follow vLLM's names (``vllm:time_to_first_token_seconds``,
``vllm:request_queue_time_seconds``, ``vllm:num_requests_running`` / ``_waiting``,
``vllm:generation_tokens_total``) under the ``freshlm_`` prefix; generated tokens per second is
``rate(freshlm_generation_tokens_total[1m])``, and the last batch's own rate is a gauge.

Gauges that are facts of shared state (queue depth, memory-bank size and adapter version per
tenant) are read at scrape time from SQL and Redis; latencies are histograms observed where the
work happens.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from service.scheduler import Scheduler, SchedulerObserver
from training.prefix_cache import PrefixCache

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ask_seconds = Histogram("freshlm_ask_seconds", "Time to answer a question", ["strategy"],
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ingest_seconds = Histogram("freshlm_ingest_seconds", "Worker time to ingest one document",
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
        self.documents_posted = Counter("freshlm_documents_posted", "New documents accepted", registry=self.registry)
        self.http_requests = Counter("freshlm_http_requests", "HTTP requests by route and status",
                                     ["method", "route", "status"], registry=self.registry)
        self.time_to_first_token = Histogram(
            "freshlm_time_to_first_token_seconds", "From a question's arrival at the scheduler to its first token",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("freshlm_request_queue_time_seconds", "Time a question waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generation_tokens = Counter("freshlm_generation_tokens", "Answer tokens generated", registry=self.registry)
        self.batch_size = Histogram("freshlm_batch_size", "Questions decoded together", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
                                    registry=self.registry)
        self.tokens_per_second = Gauge("freshlm_generation_tokens_per_second",
                                       "Generated tokens per second of the last batch", registry=self.registry)
        self.requests_cancelled = Counter("freshlm_requests_cancelled", "Questions dropped because their client left",
                                          registry=self.registry)
        self.num_requests_running = Gauge("freshlm_num_requests_running", "Questions decoding now",
                                          registry=self.registry)
        self.num_requests_waiting = Gauge("freshlm_num_requests_waiting", "Questions waiting for the model",
                                          registry=self.registry)
        self.adapter_swaps = Counter("freshlm_adapter_swaps", "Adapter versions activated by the worker",
                                     registry=self.registry)

    def watch_scheduler(self, scheduler: Scheduler) -> SchedulerObserver:
        """Running / waiting gauges read from ``scheduler`` at scrape time, and the observer that
        records its queue times, first tokens, batches and cancellations."""
        self.num_requests_running.set_function(lambda: scheduler.running)
        self.num_requests_waiting.set_function(lambda: scheduler.waiting)
        self.registry.register(_PrefixCacheCollector(scheduler.prefix_cache))

        def batch(rows: int, tokens: int, seconds: float) -> None:
            self.batch_size.observe(rows)
            self.generation_tokens.inc(tokens)
            if seconds > 0:
                self.tokens_per_second.set(tokens / seconds)

        return SchedulerObserver(queue_time=self.queue_time.observe, first_token=self.time_to_first_token.observe,
                                 batch=batch, cancelled=self.requests_cancelled.inc)

    def add_state_collector(self, read: Callable[[], dict]) -> None:
        """``read()`` -> {"queue_depth", "documents": {status: n}, "memory_bank_entries": {tenant: n} or None,
        "update_bank_entries": {tenant: n} or None, "adapter_versions": {tenant: version or None}}."""
        self.registry.register(_StateCollector(read))


class _PrefixCacheCollector:
    """vLLM's ``prefix_cache_queries`` / ``prefix_cache_hits``, in prompt tokens; the hit rate is
    ``rate(hits) / rate(queries)``."""

    def __init__(self, cache: PrefixCache) -> None:
        self.cache = cache

    def describe(self):
        return []

    def collect(self):
        yield CounterMetricFamily("freshlm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=self.cache.prompt_tokens)
        yield CounterMetricFamily("freshlm_prefix_cache_hits", "Prompt tokens whose prefill the prefix cache saved",
                                  value=self.cache.hit_tokens)
        yield GaugeMetricFamily("freshlm_prefix_cache_bytes", "Key/values held by the prefix cache",
                                value=self.cache.bytes)


class _StateCollector:
    def __init__(self, read: Callable[[], dict]) -> None:
        self.read = read

    def describe(self):
        return []

    def collect(self):
        try:
            state = self.read()
        except Exception:  # a scrape must not fail because a dependency is down; /readyz says why
            return
        yield GaugeMetricFamily("freshlm_queue_depth", "Documents waiting for the ingest worker",
                                value=state["queue_depth"])
        docs = GaugeMetricFamily("freshlm_documents", "Documents by status", labels=["status"])
        for status, n in sorted(state["documents"].items()):
            docs.add_metric([status], n)
        yield docs
        for key, help_text in (("memory_bank_entries", "Entries in the MAC memory bank"),
                               ("update_bank_entries", "Entries in the update bank (one update per document)")):
            if state.get(key) is not None:
                bank = GaugeMetricFamily(f"freshlm_{key}", help_text, labels=["tenant"])
                for tenant, n in sorted(state[key].items()):
                    bank.add_metric([tenant], n)
                yield bank
        artifacts = state.get("artifacts") or {}
        if artifacts:
            info = InfoMetricFamily("freshlm_artifact", "Active and serving artifact per kind (and the one this "
                                    "process has loaded)", labels=["kind"])
            done = GaugeMetricFamily("freshlm_artifact_switch_done", "Memory entries written for the artifact "
                                     "being switched to", labels=["kind", "target"])
            total = GaugeMetricFamily("freshlm_artifact_switch_total", "Memory entries the switch must write",
                                      labels=["kind", "target"])
            for kind, p in sorted(artifacts.items()):
                info.add_metric([kind], {"active": p["active_id"], "serving": p["serving_id"],
                                         "loaded": p.get("loaded") or "none"})
                progress = p.get("progress")
                if progress and progress.get("total") is not None:
                    done.add_metric([kind, progress["target"]], progress["done"])
                    total.add_metric([kind, progress["target"]], progress["total"])
            yield info
            yield done
            yield total
        info = InfoMetricFamily("freshlm_adapter", "The live adapter version", labels=["tenant"])
        for tenant, version in sorted(state["adapter_versions"].items()):
            info.add_metric([tenant], {"version": version or "none"})
        yield info
