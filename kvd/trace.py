"""`kvd trace REQUEST_ID [LOG ...]`: one request's timeline, rebuilt from JSON-lines logs.

Contract:
- Input: JSON-lines logs as `kvd.logs` writes them (stdout under systemd, or
  the `log.file` tee), from any number of processes and instances; no LOG (or
  `-`) reads stdin. Lines that are not JSON objects with a `ts` are skipped and
  counted (lines that do not start with `{` are counted without parsing).
- A line belongs to the request when its `request_id` equals the id, or its
  `request_ids` list (a batch-level line such as `worker_dead`) holds it.
- The timeline is sorted by `ts`; each entry shows its offset from the first
  entry, where it was logged (`role/process`), the event, its `duration_ms`,
  and the other fields.
- Verdict, by what happened:
  - FAILED when a line is at level error/critical, is a `request_failed` or
    `worker_dead` line, or carries finish_reason error, unless a successful
    `request_finished` comes after every such line (the request recovered, e.g.
    by recompute);
  - ABORTED when it ended by abort (`request_aborted`, finish_reason abort: the
    client aborted it or went away), naming the reason;
  - REJECTED when it was refused at admission (`request_rejected`, or a
    `frame_rejected` that could read its id) and never queued, naming the code;
  - finished when a `request_finished` is there; else incomplete (still
    running, or lost).
- `main` exits 0 when a line of the request was found, 1 when none was, 2 when
  a log cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

_FAILURE_EVENTS = frozenset({"request_failed", "worker_dead"})
_FAILURE_LEVELS = frozenset({"error", "critical"})
_ABORT_EVENTS = frozenset({"request_aborted", "client_disconnected"})
_REJECT_EVENTS = frozenset({"request_rejected", "frame_rejected"})
_CAUSE_KEYS = ("error", "code", "cause", "reason")
_HIDDEN = frozenset({"ts", "level", "event", "process", "role", "pid", "request_id", "request_ids", "duration_ms"})
_MAX_VALUE = 160


@dataclass
class Entry:
    """One log line of the request."""

    ts: datetime
    offset_ms: float  # since the timeline's first entry
    event: str
    level: str
    where: str  # "role/process"
    duration_ms: float | None
    fields: dict[str, Any]  # everything else on the line
    source: str  # the log it came from

    @property
    def is_failure(self) -> bool:
        return (
            self.level in _FAILURE_LEVELS
            or self.event in _FAILURE_EVENTS
            or self.fields.get("finish_reason") == "error"
        )

    @property
    def is_abort(self) -> bool:
        return self.event in _ABORT_EVENTS or self.fields.get("finish_reason") == "abort"

    @property
    def is_rejection(self) -> bool:
        return self.event in _REJECT_EVENTS

    @property
    def is_success(self) -> bool:
        return self.event == "request_finished" and not (self.is_failure or self.is_abort)


@dataclass
class Timeline:
    """A request's entries in time order, plus what was skipped and the verdict."""

    request_id: str
    entries: list[Entry] = field(default_factory=list)
    lines_read: int = 0
    skipped: int = 0  # lines that were not JSON objects with a ts
    sources: list[str] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.entries)

    @property
    def status(self) -> str:
        """"finished", "failed", "aborted", "rejected", "incomplete" or "not found"."""
        if not self.entries:
            return "not found"
        failures = [i for i, e in enumerate(self.entries) if e.is_failure]
        successes = [i for i, e in enumerate(self.entries) if e.is_success]
        if failures and not (successes and successes[-1] > failures[-1]):
            return "failed"
        if any(e.is_abort for e in self.entries):
            return "aborted"
        if successes:
            return "finished"
        queued = any(e.event == "request_queued" for e in self.entries)
        return "rejected" if not queued and any(e.is_rejection for e in self.entries) else "incomplete"

    @property
    def verdict(self) -> str:
        status = self.status
        if status == "not found":
            return f"no log line mentions request {self.request_id}"
        if status in ("failed", "aborted", "rejected"):
            first = next(e for e in self.entries if (e.is_failure, e.is_abort, e.is_rejection)[
                ("failed", "aborted", "rejected").index(status)])  # fmt: skip
            cause = " ".join(f"{k}={_show(first.fields[k])}" for k in _CAUSE_KEYS if k in first.fields)
            if status == "aborted" and not cause:
                cause = "the client left" if first.event == "client_disconnected" else "the client aborted it"
            where = "at admission" if status == "rejected" else f"at {first.event}"
            return f"{status.upper()} {where} after {first.offset_ms:.1f} ms: {cause or 'level ' + first.level}"
        if status == "finished":
            done = [e for e in self.entries if e.is_success][-1]
            errors = sum(e.is_failure for e in self.entries)
            recovered = f" after {errors} error(s), first at {_first_failure(self).event}" if errors else ""
            return f"finished ({done.fields.get('finish_reason', '?')}) in {done.offset_ms:.1f} ms{recovered}"
        last = self.entries[-1]
        return f"incomplete: last event {last.event} after {last.offset_ms:.1f} ms, no request_finished logged"


def trace(request_id: str, paths: list[str]) -> Timeline:
    """Read the logs at `paths` (stdin when empty or "-") and gather `request_id`'s lines."""
    tl = Timeline(request_id)
    needles = {request_id, json.dumps(request_id)[1:-1]}  # raw, and as JSON escapes it
    raw: list[tuple[datetime, str, dict[str, Any]]] = []
    for source, lines in _open_all(paths or ["-"]):
        tl.sources.append(source)
        for line in lines:
            tl.lines_read += 1
            line = line.strip()
            if not line.startswith("{"):
                tl.skipped += bool(line)
                continue
            if not any(n in line for n in needles):
                continue
            rec = _parse(line)
            if rec is None:
                tl.skipped += 1
                continue
            ts, obj = rec
            ids = obj.get("request_ids")
            if obj.get("request_id") == request_id or (isinstance(ids, list) and request_id in ids):
                raw.append((ts, source, obj))
    raw.sort(key=lambda r: r[0])  # stable: lines with equal ts keep file order
    if raw:
        t0 = raw[0][0]
        tl.entries = [_entry(ts, (ts - t0).total_seconds() * 1e3, source, obj) for ts, source, obj in raw]
    return tl


def format_timeline(tl: Timeline) -> str:
    """The human-readable timeline: a header, one row per entry, the verdict."""
    if not tl.found:
        return f"{tl.verdict} ({tl.lines_read} lines read from {len(tl.sources)} log(s), {tl.skipped} skipped)"
    places = sorted({e.where for e in tl.entries})
    out = [
        f"request {tl.request_id}: {len(tl.entries)} events from {len(places)} process(es) "
        f"({', '.join(places)}); {tl.skipped} non-JSON line(s) skipped",
    ]
    width_where = max(len(e.where) for e in tl.entries)
    width_event = max(len(e.event) for e in tl.entries)
    for e in tl.entries:
        duration = f"{e.duration_ms:.1f} ms" if e.duration_ms is not None else ""
        mark = "!" if e.is_failure or e.is_abort or e.is_rejection else " "
        details = " ".join(f"{k}={_show(v)}" for k, v in e.fields.items())
        out.append(
            f"{mark}{e.offset_ms:+11.1f} ms  {e.where:<{width_where}}  {e.event:<{width_event}}  {duration:>11}  {details}"
        )
    out.append(tl.verdict)
    return "\n".join(line.rstrip() for line in out)


def main(argv: list[str] | None = None) -> int:
    """`kvd trace REQUEST_ID [LOG ...]`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="kvd trace", description="Rebuild one request's timeline from kvd logs.")
    parser.add_argument("request_id")
    parser.add_argument("logs", nargs="*", metavar="LOG", help="JSON-lines log files; none or '-' reads stdin")
    args = parser.parse_args(argv)
    try:
        tl = trace(args.request_id, args.logs)
    except OSError as e:
        print(f"kvd trace: {e}", file=sys.stderr)
        return 2
    if not tl.found:
        print(format_timeline(tl), file=sys.stderr)
        return 1
    print(format_timeline(tl))
    return 0


def _open_all(paths: Iterable[str]) -> Iterator[tuple[str, Iterable[str]]]:
    for path in paths:
        if path == "-":
            yield "<stdin>", sys.stdin
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            yield path, f


def _parse(line: str) -> tuple[datetime, dict[str, Any]] | None:
    try:
        obj = json.loads(line)
        ts = datetime.fromisoformat(obj["ts"])
    except (ValueError, KeyError, TypeError):
        return None
    if ts.tzinfo is None:  # kvd writes UTC; treat a naive stamp as UTC too so it sorts with the rest
        ts = ts.replace(tzinfo=timezone.utc)
    return ts, obj


def _entry(ts: datetime, offset_ms: float, source: str, obj: dict[str, Any]) -> Entry:
    where = "/".join(str(obj[k]) for k in ("role", "process") if k in obj) or "?"
    fields = {k: v for k, v in obj.items() if k not in _HIDDEN}
    ids = obj.get("request_ids")
    if isinstance(ids, list) and len(ids) > 1:
        fields["batch"] = len(ids)
    if isinstance(fields.get("exception"), str):  # a traceback: its last line names the error
        fields["exception"] = fields["exception"].strip().splitlines()[-1]
    duration = obj.get("duration_ms")
    return Entry(
        ts=ts,
        offset_ms=offset_ms,
        event=str(obj.get("event", "?")),
        level=str(obj.get("level", "info")),
        where=where,
        duration_ms=float(duration) if isinstance(duration, (int, float)) else None,
        fields=fields,
        source=source,
    )


def _first_failure(tl: Timeline) -> Entry:
    return next(e for e in tl.entries if e.is_failure)


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    text = text if " " not in text or text.startswith(("[", "{")) else json.dumps(text)
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 3] + "..."
