"""The status page at `/`: what an operator must know about every upstream, in plain words.

Server-rendered HTML with inline CSS and no JavaScript, built from the same `status()` report
as `aptguard status --json`, so the page, the CLI and /metrics never disagree. It reads no
snapshot manifest: `status()` reads the summaries of the current snapshots (summary.py), and
snapshot ids carry their time.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import Any

from aptguard.config import Config
from aptguard.reasons import ADVICE
from aptguard.status import status
from aptguard.store import FileStore

OUTCOME_WORDS = {
    "promoted": "a new verified snapshot was promoted and is being served",
    "unchanged": "upstream had not changed; the current snapshot stays",
    "stored": "a new snapshot was verified and stored, but not promoted",
    "rejected": "refused; clients keep being served the previous snapshot",
}

CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 28px}header h1{margin:0;font-size:22px}
header p{margin:2px 0 0;color:#b8c0d0;font-size:13px}main{padding:18px 28px;max-width:1100px}
section.up{background:#fff;border-radius:8px;box-shadow:0 1px 3px #0002;margin:0 0 18px;padding:14px 20px}
h2{margin:0 0 6px;font-size:19px}h3{font-size:14px;margin:12px 0 4px;color:#4a5468}
.badge{display:inline-block;border-radius:10px;padding:1px 10px;font-size:12px;font-weight:600;
margin-left:8px;vertical-align:middle;color:#fff}
.ok{background:#2e7d32}.warn{background:#d48806}.bad{background:#c62828}.none{background:#6b7280}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 12px 3px 0;text-align:left;vertical-align:top}
th{color:#4a5468;font-weight:600}code,pre{font:12.5px ui-monospace,monospace}
pre{background:#f0f2f5;border:1px solid #d8dce3;border-radius:5px;padding:8px 10px;overflow-x:auto;margin:4px 0}
ul.warnings{margin:6px 0;padding:0;list-style:none}
ul.warnings li{background:#fff4e0;border-left:4px solid #d48806;padding:5px 10px;margin:4px 0}
.advice{color:#4a5468}.detail{font-family:ui-monospace,monospace;font-size:12.5px;word-break:break-all}
.muted{color:#6b7280}
"""


def _span(seconds: float | None) -> str:
    if seconds is None:
        return ""
    sign = "in " if seconds >= 0 else ""
    tail = "" if seconds >= 0 else " ago"
    s = abs(seconds)
    if s >= 2 * 86400:
        text = f"{s / 86400:.1f} days"
    elif s >= 3600:
        text = f"{s / 3600:.1f} hours"
    else:
        text = f"{s / 60:.0f} minutes"
    return f"{sign}{text}{tail}"


def _health(st: dict[str, Any]) -> tuple[str, str]:
    last = st["last_sync"] or {}
    if st["current"] is None:
        return "none", "not serving yet"
    if last.get("outcome") == "rejected":
        return "bad", "last sync rejected"
    if st["warnings"]:
        return "warn", "needs attention"
    return "ok", "healthy"


def _snapshot_rows(store: FileStore, name: str, st: dict[str, Any], pins: dict[str, tuple[str, str]]) -> str:
    rows = []
    for snap_id in reversed(store.snapshot_ids(name)):
        marks = []
        if snap_id == st["current"]:
            marks.append("<strong>current</strong>")
        if snap_id == st.get("previous"):
            marks.append("previous (rollback target)")
        marks += [f"pin <code>{escape(p)}</code>" for p, target in pins.items() if target == (name, snap_id)]
        rows.append(
            f"<tr><td><a href='/snapshots/{escape(name)}/{escape(snap_id)}/'><code>{escape(snap_id)}</code></a></td>"
            f"<td>{', '.join(marks)}</td></tr>"
        )
    return "<table class='snapshots'>" + "".join(rows) + "</table>" if rows else "<p class='muted'>no snapshots yet</p>"


def _upstream(config: Config, store: FileStore, name: str, st: dict[str, Any], base_url: str, pins: Any) -> str:
    up = config.upstreams[name]
    kind, label = _health(st)
    out = [
        f"<section class='up' id='up-{escape(name)}'><h2>{escape(name)}<span class='badge {kind}'>{label}</span></h2>"
    ]
    current = st["current"]
    served = f"<code>{escape(current)}</code>" if current else "<em>nothing yet</em>"
    hold = (
        " &mdash; <strong>on hold</strong> after a rollback: syncs verify and store, but do not promote"
        if st["hold"]
        else ""
    )
    out.append(f"<p>Serving snapshot {served}{hold}. Upstream: <code>{escape(up.url)}</code></p>")
    if "listed" in st:  # policy = "on-demand"
        cached, listed = st["cached"], st["listed"]
        out.append(
            f"<p class='on-demand'>On demand: {cached['files']} of {listed['files']} files held "
            f"({cached['bytes'] / 1e6:.1f} of {listed['bytes'] / 1e6:.1f} MB); the rest is fetched, verified "
            "and kept at a client's first request.</p>"
        )
    last = st["last_sync"]
    if last:
        words = OUTCOME_WORDS.get(last["outcome"], last["outcome"])
        out.append(
            f"<p class='last'>Last sync <span class='muted'>{escape(str(last['at']))}</span>: "
            f"<strong class='outcome'>{escape(last['outcome'])}</strong> &mdash; {escape(words)}.</p>"
        )
        if last.get("reason"):
            out.append(
                f"<p>Reason <code class='reason'>{escape(last['reason'])}</code>: "
                f"<span class='detail'>{escape(last.get('detail') or '')}</span><br>"
                f"<span class='advice'>What to do: {escape(ADVICE.get(last['reason'], ''))}.</span></p>"
            )
    else:
        out.append("<p class='last'>Never synced.</p>")
    if st["warnings"]:
        out.append("<ul class='warnings'>" + "".join(f"<li>{escape(w)}</li>" for w in st["warnings"]) + "</ul>")
    if st["suites"]:
        out.append(
            "<h3>Served Release files</h3><table><tr><th>suite</th><th>Date</th><th>Valid-Until</th><th></th></tr>"
        )
        for suite, info in st["suites"].items():
            left = info.get("valid_until_seconds")
            out.append(
                f"<tr><td>{escape(suite)}</td><td>{escape(str(info['date']))}</td>"
                f"<td>{escape(info['valid_until'] or 'none')}</td><td>{_span(left)}</td></tr>"
            )
        out.append("</table>")
    if st["keys"]:
        out.append("<h3>Trusted keys</h3><table><tr><th>fingerprint</th><th>user id</th><th>expires</th><th></th></tr>")
        for key in st["keys"]:
            out.append(
                f"<tr><td><code>{escape(key['fingerprint'])}</code></td><td>{escape(key.get('uid') or '')}</td>"
                f"<td>{escape(key.get('expires') or 'never')}</td><td>{_span(key.get('expires_seconds'))}</td></tr>"
            )
        out.append("</table>")
    out.append("<h3>Snapshots</h3>" + _snapshot_rows(store, name, st, pins))
    lines = "\n".join(
        f"deb [signed-by=/etc/apt/keyrings/{name}.asc] {base_url}/{name} {suite} {' '.join(up.components)}"
        for suite in up.suites
    )
    out.append(
        "<h3>sources.list</h3><pre class='sources'>"
        + escape(lines)
        + "</pre><p class='muted'>Put the upstream's own key in "
        f"<code>/etc/apt/keyrings/{escape(name)}.asc</code> (aptguard serves upstream's signatures unchanged). "
        f"<code>aptguard sources {escape(name)}</code> prints a deb822 stanza.</p></section>"
    )
    return "".join(out)


def render(config: Config, store: FileStore, base_url: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    report = status(config, store, now)["upstreams"]
    pins = store.pins()
    sections = [_upstream(config, store, name, st, base_url, pins) for name, st in report.items()]
    pin_rows = "".join(
        f"<tr><td><code>{escape(pin)}</code></td><td>{escape(name)} <code>{escape(snap_id)}</code></td>"
        f"<td><code>{escape(base_url)}/pins/{escape(pin)}/</code></td></tr>"
        for pin, (name, snap_id) in pins.items()
    )
    pins_html = (
        f"<section class='up' id='pins'><h2>Pins</h2><table><tr><th>pin</th><th>snapshot</th><th>URL</th></tr>"
        f"{pin_rows}</table></section>"
        if pins
        else ""
    )
    healthy = sum(1 for st in report.values() if _health(st)[0] == "ok")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>aptguard status</title>"
        f"<meta name='viewport' content='width=device-width'><style>{CSS}</style></head><body>"
        f"<header><h1>aptguard</h1><p>{healthy} of {len(report)} upstreams healthy &middot; "
        f"{escape(now.strftime('%Y-%m-%d %H:%M:%S UTC'))} &middot; <a style='color:#9cc3ff' href='/status'>/status</a> "
        f"&middot; <a style='color:#9cc3ff' href='/metrics'>/metrics</a></p></header><main>"
        + ("".join(sections) or "<p>No upstreams configured: add an [upstreams.NAME] table to the config.</p>")
        + pins_html
        + "</main></body></html>"
    )
