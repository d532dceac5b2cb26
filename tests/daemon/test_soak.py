"""A short run of `kvd bench soak`: a real daemon, requests with aborts, disconnects,
duplicate ids, malformed frames on the client and internal channels, and kill -9 of the
worker (a unified instance runs no messenger; the PD soak kills that too); afterwards
nothing hangs, leaks or comes back wrong."""

from __future__ import annotations

from dataclasses import replace

from kvd.bench.soak import SoakConfig, render, soak

SHORT = replace(SoakConfig(), requests=240, concurrency=16, max_tokens=(1, 6), prompts=16, abort=0.08,
                disconnect=0.06, duplicate=0.05, malformed=0.05, internal_junk_every=60, kill_worker_every=100)


def test_short_soak_with_faults_balances_its_books(tmp_path, smollm2_dir):
    report = soak(SHORT, tmp_path)
    text = render(report)
    assert report.hangs == [], text
    assert report.mismatches == [], text
    assert report.leaked_blocks == 0 and report.integrity == "ok", text
    assert report.faults["kill -9 worker-0"] == 2, text
    assert report.outcomes["completed, identical to the offline engine"] > 100, text
    assert report.outcomes["duplicate id refused"] > 0 and report.outcomes["aborted by the client"] > 0, text
    assert report.outcomes["duplicate id ACCEPTED"] == 0, text
    assert report.trace_checks and all(ok for _, _, ok in report.trace_checks), text
