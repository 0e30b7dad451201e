"""What changed between two snapshots: packages added, removed, upgraded and downgraded.

Read from the manifests (each lists, per suite and "component/arch", the packages its verified
indices name), so a diff never re-reads an index. Versions compare the way dpkg does.
"""

from __future__ import annotations

from typing import Any

from debian.debian_support import Version

from aptguard.store import FileStore

Listing = dict[str, dict[str, dict[str, str]]]  # suite -> "main/amd64" -> package -> version


def packages_of(store: FileStore, name: str, snap_id: str | None) -> Listing:
    """The package listing of a snapshot (empty for None: "before the first snapshot")."""
    if snap_id is None:
        return {}
    return store.read_manifest(name, snap_id).packages


def compare(old: Listing, new: Listing) -> dict[str, dict[str, dict[str, list[dict[str, str]]]]]:
    """suite -> "component/arch" -> {added, removed, upgraded, downgraded}: sorted by package.

    added/removed entries are {"package", "version"}; upgraded/downgraded are
    {"package", "from", "to"}. A component/arch with no change is left out.
    """
    result: dict[str, dict[str, dict[str, list[dict[str, str]]]]] = {}
    for suite in sorted(set(old) | set(new)):
        before_suite, after_suite = old.get(suite, {}), new.get(suite, {})
        for group in sorted(set(before_suite) | set(after_suite)):
            before, after = before_suite.get(group, {}), after_suite.get(group, {})
            change: dict[str, list[dict[str, str]]] = {"added": [], "removed": [], "upgraded": [], "downgraded": []}
            for pkg in sorted(set(before) | set(after)):
                if pkg not in before:
                    change["added"].append({"package": pkg, "version": after[pkg]})
                elif pkg not in after:
                    change["removed"].append({"package": pkg, "version": before[pkg]})
                elif before[pkg] != after[pkg]:
                    move = {"package": pkg, "from": before[pkg], "to": after[pkg]}
                    newer = Version(after[pkg]) > Version(before[pkg])
                    change["upgraded" if newer else "downgraded"].append(move)
            if any(change.values()):
                result.setdefault(suite, {})[group] = change
    return result


def diff(store: FileStore, name: str, old_id: str | None, new_id: str) -> dict[str, Any]:
    """The `diff --json` document: both ids and the changes per suite and component/arch."""
    return {
        "upstream": name,
        "from": old_id,
        "to": new_id,
        "suites": compare(packages_of(store, name, old_id), packages_of(store, name, new_id)),
    }


def _counts(suite: str, group: str, change: dict[str, list[dict[str, str]]]) -> str:
    return (
        f"{suite} {group}: +{len(change['added'])} -{len(change['removed'])} "
        f"^{len(change['upgraded'])} v{len(change['downgraded'])}"
    )


def count_lines(changes: dict[str, Any]) -> list[str]:
    """One short line per suite and component/arch: "bookworm main/amd64: +2 -0 ^3 v0"."""
    return [
        _counts(suite, group, change) for suite, groups in changes["suites"].items() for group, change in groups.items()
    ]


def detail_lines(changes: dict[str, Any]) -> list[str]:
    """The count line of each group followed by one line per package change."""
    lines = []
    for suite, groups in changes["suites"].items():
        for group, change in groups.items():
            lines.append(_counts(suite, group, change))
            lines += [f"  + {c['package']} {c['version']}" for c in change["added"]]
            lines += [f"  - {c['package']} {c['version']}" for c in change["removed"]]
            lines += [f"  ^ {c['package']} {c['from']} -> {c['to']}" for c in change["upgraded"]]
            lines += [f"  v {c['package']} {c['from']} -> {c['to']}" for c in change["downgraded"]]
    return lines
