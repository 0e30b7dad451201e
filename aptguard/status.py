"""What `status`, `/status`, the status page and the metrics report: one function, one shape.

It reads the small state file of each upstream and the summary of its current snapshot
(summary.py), which parses a manifest once per process, not once per call: the server calls
this for every request to /, /status and /metrics.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aptguard import summary
from aptguard.config import Config
from aptguard.snapshot import rollback_target
from aptguard.store import FileStore


def _parse(when: str | None) -> datetime | None:
    return datetime.fromisoformat(when) if when else None


def _span(seconds: float) -> str:
    if abs(seconds) >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds / 3600:.1f} h"


def upstream_status(config: Config, store: FileStore, name: str, now: datetime | None = None) -> dict[str, Any]:
    """Current snapshot, hold, last sync and the warnings an operator must act on before clients fail."""
    now = now or datetime.now(UTC)
    state = store.read_state(name)
    current = store.current(name)
    warnings: list[str] = []
    suites: dict[str, Any] = {}
    if current is not None:
        try:
            served = summary.load(store, name, current)
        except FileNotFoundError:
            served = {"suites": {}}
            warnings.append(f"current snapshot {current} has no manifest: run `aptguard fsck {name}`")
        for suite, meta in served["suites"].items():
            valid_until = _parse(meta.get("valid_until"))
            left = (valid_until - now).total_seconds() if valid_until else None
            suites[suite] = {"date": meta["date"], "valid_until": meta.get("valid_until"), "valid_until_seconds": left}
            if left is not None and left < config.valid_until_margin_hours * 3600:
                if left <= 0:
                    warnings.append(
                        f"{suite}: the served Release expired {_span(-left)} ago (Valid-Until {meta['valid_until']}); "
                        "clients fail with 'Release file is expired' until a newer one is promoted"
                    )
                else:
                    remedy = (
                        "a sync re-signs it once half of valid_days has passed: check the sync timer"
                        if "published" in served
                        else "a newer upstream Release must be synced before then"
                    )
                    warnings.append(
                        f"{suite}: the served Release expires in {_span(left)} (Valid-Until {meta['valid_until']}); "
                        + remedy
                    )
    elif state.last_sync is None:
        warnings.append("never synced: run `aptguard sync " + name + "`")
    keys = []
    for key in state.keys or []:
        expires = _parse(key.expires)
        left = (expires - now).total_seconds() if expires else None
        keys.append({**key.to_json(), "expires_seconds": left})
        if left is not None and left < config.key_expiry_margin_days * 86400:
            verb = f"expired {_span(-left)} ago" if left <= 0 else f"expires in {_span(left)}"
            warnings.append(
                f"trusted key {key.fingerprint} {verb}: get the upstream's renewed key into "
                f"{config.upstreams[name].keyring if name in config.upstreams else 'the keyring'}"
            )
    signing = []
    for key in (served.get("published") or {}).get("keys", []) if current is not None else []:
        expires = _parse(key.get("expires"))
        left = (expires - now).total_seconds() if expires else None
        signing.append({**key, "expires_seconds": left})
        if left is not None and left < config.key_expiry_margin_days * 86400:
            verb = f"expired {_span(-left)} ago" if left <= 0 else f"expires in {_span(left)}"
            warnings.append(
                f"signing key {key['fingerprint']} of the published view {verb}: extend it or add a new key "
                "to sign_with (both sign until the old one is dropped)"
            )
    last_success = _parse(state.last_success)
    if last_success is not None and now - last_success > timedelta(hours=config.stale_sync_hours):
        warnings.append(
            f"last successful sync {_span((now - last_success).total_seconds())} ago: check the sync timer and "
            "the last sync's reason"
        )
    if state.held:
        warnings.append(f"on hold since a rollback: syncs store but do not promote until `aptguard promote {name} ID`")
    on_demand = {}
    if current is not None and name in config.upstreams and config.upstreams[name].policy == "on-demand":
        on_demand = _on_demand(store, name, current)
    return {
        **on_demand,
        "current": current,
        "hold": state.held,
        "last_sync": state.last_sync.to_json() if state.last_sync is not None else None,
        "last_success": state.last_success,
        "previous": rollback_target(store, name, state),
        "suites": suites,
        "keys": keys,
        **({"signing_keys": signing} if signing else {}),
        "warnings": warnings,
    }


def _on_demand(store: FileStore, name: str, current: str) -> dict[str, Any]:
    """`listed` (every file of the current snapshot) and `cached` (those held now) of an
    on-demand upstream: its pool files are fetched at clients' first requests."""
    try:
        manifest = store.read_manifest(name, current)
    except (OSError, ValueError):
        return {}
    held = store.held({r["sha256"] for r in manifest.listed.values()})
    cached = [r["size"] for r in manifest.listed.values() if r["sha256"] in held]
    listed_bytes = sum(r["size"] for r in manifest.listed.values())
    return {
        "listed": {"files": manifest.count + len(manifest.listed), "bytes": manifest.bytes + listed_bytes},
        "cached": {"files": manifest.count + len(cached), "bytes": manifest.bytes + sum(cached)},
    }


def status(config: Config, store: FileStore, now: datetime | None = None) -> dict[str, Any]:
    return {"upstreams": {name: upstream_status(config, store, name, now) for name in config.upstreams}}
