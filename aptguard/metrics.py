"""Prometheus metrics: the health of every upstream (from the data folder) and this server's traffic.

Upstream metrics are read at scrape time from the same place `status` reads (state/NAME.json,
the current snapshot's summary, the keyring expiry recorded by the last sync), so they speak
the reason codes of reasons.py and stay right across restarts. Sync outcome counters are
persisted by sync.py in the state file (`outcomes`), so they count every run, not only the
runs this process saw.

Request counters count every response of the server. With `serve --workers N` the workers
share them through prometheus_client's multiprocess mode: `serve` sets PROMETHEUS_MULTIPROC_DIR
(a private folder, removed when the server stops) before this module is imported, each worker
writes its counts there, and a scrape, whichever worker answers it, sums them all.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from aptguard import summary
from aptguard.config import Config
from aptguard.status import status
from aptguard.store import FileStore


@dataclass
class ServerMetrics:
    """One server process's registry: request counters plus the upstream collector."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "aptguard_http_requests",
            "HTTP requests answered by this server, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.sent = Counter(
            "aptguard_http_sent_bytes",
            "Response body bytes sent by this server (as declared by Content-Length)",
            registry=self.registry,
        )
        self.on_demand = Counter(
            "aptguard_on_demand_fetches",
            "On-demand pool files this server fetched for clients, by upstream and outcome "
            "(fetched, mismatch: failed verification, error: upstream unreachable, missing: 404 upstream)",
            ["upstream", "outcome"],
            registry=self.registry,
        )
        self.on_demand_bytes = Counter(
            "aptguard_on_demand_fetched_bytes",
            "Bytes of on-demand pool files fetched and verified",
            ["upstream"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, int], Any] = {}  # labels() looks up and locks per call
        self.upstreams: UpstreamCollector | None = None
        self.lock = threading.Lock()  # two scrapes at once must not both register the collector
        self.shared = multiprocess_dir()

    def fetched(self, upstream: str, outcome: str, size: int = 0) -> None:
        """Count an on-demand fetch (ondemand.py)."""
        self.on_demand.labels(upstream, outcome).inc()
        if size:
            self.on_demand_bytes.labels(upstream).inc(size)

    def count(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Count a response that has gone out (file, 304, 404, 416, ...)."""
        # A client chooses the method: any word it sends must not become a label of its own.
        method = request.method if request.method in ("GET", "HEAD") else "other"
        key = (method, response.status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(method, str(response.status))
        child.inc()
        if request.method != "HEAD" and response.content_length:
            self.sent.inc(response.content_length)


def multiprocess_dir() -> str | None:
    """The folder the workers of one `serve --workers N` share their counters in, if any."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _ts(when: str | None) -> float | None:
    return datetime.fromisoformat(when).timestamp() if when else None


def snapshot_time(snap_id: str) -> float | None:
    """A snapshot id is its sync's UTC time (YYYYMMDDTHHMMSSZ, maybe with a -N suffix)."""
    try:
        return datetime.strptime(snap_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


class UpstreamCollector(Collector):
    """Reads the data folder at each scrape; the bytes of objects/ are cached for a minute."""

    def __init__(self, config: Config, store: FileStore) -> None:
        self.config = config
        self.store = store
        self._stored: tuple[float, int] | None = None

    def stored_bytes(self) -> int:
        now = time.monotonic()
        if self._stored is None or now - self._stored[0] > 60:
            self._stored = (now, self.store.object_totals()[1])
        return self._stored[1]

    def snapshot_bytes(self, name: str, snap_id: str) -> int | None:
        try:
            size = summary.load(self.store, name, snap_id)["bytes"]
        except (OSError, ValueError):
            return None
        return None if size is None else int(size)

    def collect(self) -> Iterator[Any]:
        now = time.time()
        if self.store.remote:  # the s3 backend: whether this server reaches the store
            health = self.store.serving().health()  # type: ignore[attr-defined]
            reachable = GaugeMetricFamily("aptguard_store_reachable", "1 if the last refresh reached the object store")
            reachable.add_metric([], 1 if health["reachable"] else 0)
            since = GaugeMetricFamily(
                "aptguard_store_unreachable_seconds", "How long the object store has not answered (0: it answers)"
            )
            since.add_metric([], now - health["unreachable_since"] if health["unreachable_since"] else 0)
            cached = GaugeMetricFamily("aptguard_cache_bytes", "Bytes of objects in this server's cache")
            cached.add_metric([], health["cached_bytes"])
            yield from (reachable, since, cached)
            if not health["reachable"]:
                return  # every other figure is read from the store
        report = status(self.config, self.store)["upstreams"]
        outcomes = CounterMetricFamily(
            "aptguard_sync_outcomes",
            "Syncs ended, by outcome and reason code",
            labels=["upstream", "outcome", "reason"],
        )
        last = GaugeMetricFamily(
            "aptguard_last_sync_info",
            "The last sync's outcome and reason (value 1)",
            labels=["upstream", "outcome", "reason"],
        )
        last_at = GaugeMetricFamily(
            "aptguard_last_sync_timestamp_seconds", "When the last sync ran", labels=["upstream"]
        )
        success = GaugeMetricFamily(
            "aptguard_last_success_timestamp_seconds", "When a sync last ended without rejection", labels=["upstream"]
        )
        age = GaugeMetricFamily(
            "aptguard_current_snapshot_age_seconds", "Age of the snapshot served as current", labels=["upstream"]
        )
        hold = GaugeMetricFamily("aptguard_hold", "1 while the upstream is held after a rollback", labels=["upstream"])
        valid = GaugeMetricFamily(
            "aptguard_release_valid_until_seconds",
            "Seconds until the served Release's Valid-Until passes (negative: expired)",
            labels=["upstream", "suite"],
        )
        keys = GaugeMetricFamily(
            "aptguard_key_expiry_seconds",
            "Seconds until a trusted signing key expires (negative: expired)",
            labels=["upstream", "fingerprint"],
        )
        signing = GaugeMetricFamily(
            "aptguard_signing_key_expiry_seconds",
            "Seconds until a key signing the published view expires (negative: expired)",
            labels=["upstream", "fingerprint"],
        )
        snapshots = GaugeMetricFamily("aptguard_snapshots", "Snapshots stored", labels=["upstream"])
        current_bytes = GaugeMetricFamily(
            "aptguard_current_snapshot_bytes", "Bytes of the files of the current snapshot", labels=["upstream"]
        )
        warnings = GaugeMetricFamily("aptguard_warnings", "Warnings shown by `aptguard status`", labels=["upstream"])
        for name, st in report.items():
            state = self.store.read_state(name)
            for key, count in sorted((state.outcomes or {}).items()):
                outcome, _, reason = key.partition(":")
                outcomes.add_metric([name, outcome, reason], count)
            if st["last_sync"]:
                ls = st["last_sync"]
                last.add_metric([name, ls["outcome"], ls["reason"] or ""], 1)
                if (at := _ts(ls["at"])) is not None:
                    last_at.add_metric([name], at)
            if (ok := _ts(st.get("last_success"))) is not None:
                success.add_metric([name], ok)
            hold.add_metric([name], 1 if st["hold"] else 0)
            if st["current"] and (made := snapshot_time(st["current"])) is not None:
                age.add_metric([name], now - made)
            for suite, info in st["suites"].items():
                if info.get("valid_until_seconds") is not None:
                    valid.add_metric([name, suite], info["valid_until_seconds"])
            for key in st["keys"]:
                if key.get("expires_seconds") is not None:
                    keys.add_metric([name, key["fingerprint"]], key["expires_seconds"])
            for key in st.get("signing_keys", []):
                if key.get("expires_seconds") is not None:
                    signing.add_metric([name, key["fingerprint"]], key["expires_seconds"])
            snapshots.add_metric([name], len(self.store.snapshot_ids(name)))
            if st["current"] and (size := self.snapshot_bytes(name, st["current"])) is not None:
                current_bytes.add_metric([name], size)
            warnings.add_metric([name], len(st["warnings"]))
        stored = GaugeMetricFamily("aptguard_stored_bytes", "Bytes of every stored object (all upstreams)")
        stored.add_metric([], self.stored_bytes())
        yield from (
            outcomes,
            last,
            last_at,
            success,
            age,
            hold,
            valid,
            keys,
            signing,
            snapshots,
            current_bytes,
            warnings,
            stored,
        )


def exposition(config: Config, store: FileStore, server: ServerMetrics) -> tuple[bytes, str]:
    """The /metrics body and its content type (called from the server's worker threads)."""
    with server.lock:
        if server.upstreams is None:
            server.upstreams = UpstreamCollector(config, store)
            if server.shared:  # every worker's request counters, summed, instead of this one's
                server.registry = CollectorRegistry()
                MultiProcessCollector(server.registry, path=server.shared)
            server.registry.register(server.upstreams)
    return generate_latest(server.registry), CONTENT_TYPE_LATEST
