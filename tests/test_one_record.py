"""One request record: the engine, scheduler, connector and daemon keep no table beside
`Scheduler.requests` (docs/architecture.md, "One request record").

Every dict an object of those packages keeps on `self` is listed here with what it is
keyed by. A new one fails this test until it is added with its reason — and a dict keyed
by request id belongs on the record instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kvd

ROOT = Path(kvd.__file__).parent
PACKAGES = ("daemon", "engine", "scheduler", "connector")

KNOWN = {
    "scheduler/scheduler.py:Scheduler.requests": "the one table of records, by request id",
    "connector/transfers.py:PoolTransfers._tasks": "transfers in flight, by messenger task id (each holds its record)",
    "daemon/frontend.py:DisconnectWatch._fd_clients": "client identities, by connection file descriptor",
    "daemon/supervisor.py:Supervisor._channels": "the children's channels, by process name",
    "daemon/supervisor.py:Supervisor._ready": "Ready handshakes awaited, by process name",
    "daemon/pd/handoff.py:PDRole.counts": "the role's counters, by name",
    "daemon/openai_api.py:TokenText._texts": "token texts, by token id (a cache)",
    "daemon/openai_api.py:Shape._offsets": "one HTTP response's text offsets, by choice index",
    "daemon/openai_api.py:Shape._calls": "one HTTP response's tool call parsers, by choice index",
}

_DICT_CALLS = ("dict", "defaultdict", "collections.defaultdict", "OrderedDict")


def _is_dict(value: ast.expr | None, annotation: str) -> bool:
    if annotation.startswith(_DICT_CALLS):
        return True
    if isinstance(value, (ast.Dict, ast.DictComp)):
        return True
    return isinstance(value, ast.Call) and ast.unparse(value.func) in _DICT_CALLS


def dict_attributes() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]:
                for node in ast.walk(cls):
                    if isinstance(node, ast.AnnAssign):
                        targets, value, annotation = [node.target], node.value, ast.unparse(node.annotation)
                    elif isinstance(node, ast.Assign):
                        targets, value, annotation = node.targets, node.value, ""
                    else:
                        continue
                    for t in targets:
                        if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self" and _is_dict(value, annotation):
                            found.add(f"{path.relative_to(ROOT).as_posix()}:{cls.name}.{t.attr}")
    return found


def test_the_scan_sees_the_request_table():
    assert "scheduler/scheduler.py:Scheduler.requests" in dict_attributes()


def test_no_table_beside_the_record():
    found = dict_attributes()
    assert found - KNOWN.keys() == set(), "a new dict on self: is it keyed by request id? put it on the record"
    assert KNOWN.keys() - found == set(), "gone: drop it from KNOWN"
