"""Serving in-process with a fake step: admission, the step loop and the text stage as the two
coroutines the daemon runs, stop strings, aborts, failures, deadlines and the one end of a
request — no processes, no sockets. The fake worker mirrors the real runner's books (the
step diff) and "samples" the prompt's own tokens in a loop, so the text is predictable."""

from __future__ import annotations

import asyncio
import os

import msgspec
import pytest

from kvd.config import DaemonConfig, KvdConfig
from kvd.daemon.role import Role
from kvd.daemon.owner import Rejected
from kvd.daemon.serving import Serving
from kvd.messages import ChatMessage, ErrorCode, Generate, Ready
from kvd.model_info import ModelInfo
from kvd.sampling import SamplingParams
from kvd.scheduler.output import ModelOutput, SchedulerOutput

TEXT = "naïve café and numbers 3.14159 and double spaces"


class FakeWorker:
    """The supervisor's step round trip, with a runner that keeps each request's tokens as the
    real one does and samples prompt[i % len(prompt)] as the i-th output token."""

    def __init__(self) -> None:
        self.tokens: dict[str, tuple[list[int], int]] = {}  # request id -> (tokens, prompt length)
        self.sampled: dict[str, int] = {}  # request id -> tokens sampled for it
        self.step_started = None
        self.steps = 0

    async def run_step(self, so: SchedulerOutput) -> ModelOutput:
        for request_id in [*so.finished_request_ids, *so.preempted_request_ids]:
            self.tokens.pop(request_id, None)
        for new in so.new_reqs:
            self.tokens[new.request_id] = (list(new.token_ids), new.num_prompt_tokens)
        computed = {r.request_id: r.num_computed_tokens for r in [*so.new_reqs, *so.cached_reqs]}
        ids, sampled = [], []
        forked = {child: 0 for child in so.forks}  # a forked choice computes nothing and samples
        for request_id, n in [*so.num_scheduled_tokens.items(), *forked.items()]:
            tokens, num_prompt = self.tokens[request_id]
            if computed[request_id] + n == len(tokens):
                tokens.append(tokens[(len(tokens) - num_prompt) % num_prompt])
                self.sampled[request_id] = self.sampled.get(request_id, 0) + 1
                ids.append(request_id)
                sampled.append(tokens[-1])
        self.steps += 1
        await asyncio.sleep(0.001)  # the worker computes: the text stage runs meanwhile
        return ModelOutput(so.step, ids, sampled)

    def send_cache_task(self, task) -> None:
        raise AssertionError("a unified instance moves no KV")

    def status(self) -> dict:
        return {"processes": {}}


class Inbox:
    """A recording Outbox."""

    def __init__(self) -> None:
        self.deltas: dict[str, list] = {}
        self.failures: dict[str, tuple[ErrorCode, str]] = {}
        self.done: dict[str, asyncio.Event] = {}

    def expect(self, request_id: str) -> asyncio.Event:
        return self.done.setdefault(request_id, asyncio.Event())

    async def deliver(self, delta) -> None:
        self.deltas.setdefault(delta.request_id, []).append(delta)
        if delta.output is not None:
            self.expect(delta.request_id).set()

    async def fail(self, request_id: str, code: ErrorCode, message: str) -> None:
        assert request_id not in self.failures, "a request failed twice"
        self.failures[request_id] = (code, message)
        self.expect(request_id).set()


class Harness:
    """Serving on a fake worker, with its step loop and text stage running (a `with` block).
    A PD test passes its role class, config, worker (the messenger's fake too) and the
    role's ZeroMQ context and run directory."""

    def __init__(self, tokenizer, compute_threads: int = 0, role: type[Role] = Role, cfg: KvdConfig | None = None,
                 worker: FakeWorker | None = None, ctx=None, run_dir=None, **daemon) -> None:  # fmt: skip
        cfg = cfg or KvdConfig(daemon=DaemonConfig(**daemon))
        self.worker = worker or FakeWorker()
        self.serving = Serving(cfg, self.worker, tokenizer, role, fatal=self._fatal, ctx=ctx, run_dir=run_dir)
        self.serving.on_worker_ready(Ready(process="worker-0", pid=0, info=ModelInfo(
            vocab_size=tokenizer.vocab_size, max_model_len=512, eos_token_ids=[], num_blocks=256, block_size=4,
            compute_threads=compute_threads)))
        self.inbox = Inbox()
        self.fatal = False
        self.tasks: list[asyncio.Task] = []

    def _fatal(self) -> None:
        self.fatal = True

    def __enter__(self):
        self.tasks = [asyncio.create_task(self.serving.run(), name="step-loop"),
                      asyncio.create_task(self.serving.run_text(), name="text-stage"),
                      *(asyncio.create_task(reader) for reader in self.serving.role.readers())]  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        for t in self.tasks:
            t.cancel()

    def submit(self, request_id: str, **kw) -> asyncio.Event:
        params = SamplingParams(**{"max_tokens": 24, "ignore_eos": True} | kw.pop("params", {}))
        self.serving.submit(Generate(request_id=request_id, params=params, **kw), self.inbox)
        return self.inbox.expect(request_id)

    async def settle(self) -> None:
        """Until the engine is idle, then check what an idle daemon checks."""
        await asyncio.wait_for(self.serving.idle.wait(), 10)
        for _ in range(50):
            if not self.serving.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        assert self.serving.check_integrity() and self.serving.integrity == "ok" and not self.fatal
        assert self.serving.engine.kv.pool.num_held == 0 and not self.serving.engine.requests()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_streamed_text_adds_up_and_the_request_ends_once(tokenizer):
    async def main():
        with Harness(tokenizer) as h:
            done = [h.submit(f"r{i}", prompt=TEXT[i:]) for i in range(4)]
            await asyncio.gather(*(d.wait() for d in done))
            await h.settle()
            for i in range(4):
                deltas = h.inbox.deltas[f"r{i}"]
                out = deltas[-1].output
                assert [d.output is not None for d in deltas].count(True) == 1  # exactly one final message
                assert out.finish_reason == "length" and len(out.token_ids) == 24
                assert sum((d.token_ids for d in deltas), []) == out.token_ids
                assert "".join(d.text for d in deltas) == out.text == tokenizer.decode(out.token_ids,
                                                                                       skip_special_tokens=True)
            assert h.serving.num_client_requests == 0 and h.serving.idle.is_set()

    run(main())


def test_the_step_loop_runs_no_tokenizer_code(tokenizer):
    """Every encode and decode happens at admission or in the text stage's coroutine, never in
    the coroutine that schedules steps."""
    calls: list[str] = []

    class Spy:
        def __getattr__(self, name):
            attr = getattr(tokenizer, name)
            if name not in ("decode", "encode", "apply_chat_template", "convert_ids_to_tokens"):
                return attr

            def spied(*a, **kw):
                task = asyncio.current_task()
                calls.append(task.get_name() if task is not None else "no task")
                return attr(*a, **kw)

            return spied

    async def main():
        with Harness(Spy()) as h:
            done = [h.submit(f"r{i}", prompt=TEXT, params={"stop": ["spaces"]}) for i in range(8)]
            await asyncio.gather(*(d.wait() for d in done))
            await h.settle()
            assert h.worker.steps > 10
        return h

    run(main())
    assert calls and "step-loop" not in calls, sorted(set(calls))
    assert "text-stage" in calls


@pytest.mark.parametrize("overlap", [True, False])
def test_a_stop_string_ends_the_request_in_the_engine(tokenizer, overlap):
    """Overlapped (a core to spare), the worker may compute one token past the stop, which is
    dropped; waited for (the worker computes on every core), it computes none."""
    cores = len(os.sched_getaffinity(0))

    async def main():
        with Harness(tokenizer, compute_threads=cores - 1 if overlap else cores) as h:
            assert h.serving.overlap_text == overlap
            ref = h.submit("ref", prompt=TEXT)
            await ref.wait()
            text = h.inbox.deltas["ref"][-1].output.text
            stop = text[len(text) // 3 : len(text) // 3 + 4]
            steps = h.worker.steps
            await h.submit("cut", prompt=TEXT, params={"stop": [stop]}).wait()
            await h.settle()
            out = h.inbox.deltas["cut"][-1].output
            assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
            assert "".join(d.text for d in h.inbox.deltas["cut"]) == out.text
            # The engine stopped it: at most one step past the one that completed the stop.
            assert h.worker.steps - steps <= len(out.token_ids) + 2 < 24
            assert h.worker.sampled["cut"] - len(out.token_ids) in ((0, 1) if overlap else (0,))

    run(main())


def test_abort_fail_and_deadline_each_end_a_request_once(tokenizer):
    async def main():
        with Harness(tokenizer, request_timeout_s=0.3) as h:
            long = {"max_tokens": 400}
            a, f, d = (h.submit(rid, prompt=TEXT, params=long) for rid in ("a", "f", "d"))
            while not all(h.inbox.deltas.get(rid) for rid in "afd"):
                await asyncio.sleep(0.005)
            h.serving.abort("a")
            h.serving.abort("a")  # idempotent
            await h.serving.fail("f", ErrorCode.KV_TRANSFER_FAILED, "kv transfer: test")
            await a.wait()
            assert h.inbox.deltas["a"][-1].output.finish_reason == "abort"
            assert h.inbox.failures["f"] == (ErrorCode.KV_TRANSFER_FAILED, "kv transfer: test")
            await asyncio.sleep(0.35)
            await h.serving.tick()  # the deadline: 504
            await d.wait()
            assert h.inbox.failures["d"][0] == ErrorCode.DEADLINE
            await h.settle()
            n = {rid: len(h.inbox.deltas[rid]) for rid in "afd"}
            await asyncio.sleep(0.05)
            assert {rid: len(h.inbox.deltas[rid]) for rid in "afd"} == n  # nothing after the end
            assert [d.output is not None for d in h.inbox.deltas["f"]].count(True) == 0

    run(main())


def test_an_n_choice_request_ends_every_choice_on_abort_and_on_failure(tokenizer):
    async def main():
        with Harness(tokenizer) as h:
            long = {"max_tokens": 400, "n": 3}
            a, f = h.submit("a", prompt=TEXT, params=long), h.submit("f", prompt=TEXT, params=long)
            ids = [f"{r}{c}" for r in "af" for c in ("", "/1", "/2")]
            while not all(h.inbox.deltas.get(rid) for rid in ids):
                await asyncio.sleep(0.005)
            assert sorted(d.index for rid in ids[:3] for d in h.inbox.deltas[rid][:1]) == [0, 1, 2]
            h.serving.abort("a")  # the client's id ends all three
            await h.serving.fail("f/1", ErrorCode.INTERNAL, "test")  # one choice's failure ends the others
            await a.wait()
            await h.settle()  # no block held, integrity ok
            assert all(h.inbox.deltas[rid][-1].output.finish_reason == "abort" for rid in ids[:3])
            assert set(h.inbox.failures) == {"f", "f/1", "f/2"}
            assert h.serving.num_client_requests == 0

    run(main())


def test_bad_requests_are_refused_before_anything_is_held(tokenizer):
    async def main():
        with Harness(tokenizer, max_queue=64) as h:
            cases = [
                ({"prompt": TEXT, "prompt_token_ids": [1, 2]}, "prompt: give exactly one"),
                ({"prompt_token_ids": [1, 10**6]}, "prompt_token_ids: token id 1000000"),
                ({"chat": [ChatMessage("robot", "hi")]}, "chat[0].role"),
                ({"prompt": ""}, "prompt: must not be empty"),
                ({"prompt": TEXT, "params": {"max_tokens": 600}}, "max_tokens:"),
            ]
            for kw, message in cases:
                with pytest.raises(Rejected) as e:
                    h.submit("bad", **kw)
                assert e.value.code == ErrorCode.BAD_REQUEST and e.value.message.startswith(message), e.value.message
            live = h.submit("live", prompt=TEXT, params={"max_tokens": 200})
            with pytest.raises(Rejected) as e:
                h.submit("live", prompt=TEXT)
            assert "already in use" in e.value.message
            await live.wait()
            assert h.inbox.deltas["live"][-1].output.finish_reason == "length"
            await h.settle()

    run(main())


def test_a_chat_without_max_tokens_gets_what_the_context_leaves(chat_tokenizer):
    async def main():
        with Harness(chat_tokenizer) as h:
            gen = Generate(request_id="c", chat=[ChatMessage("user", TEXT)], params=SamplingParams(ignore_eos=True))
            h.serving.submit(gen, h.inbox, fill_max_tokens=True)
            request = h.serving.record("c")
            n = len(request.prompt_token_ids)
            assert request.sampling_params.max_tokens == 512 - n  # the context's room after the template
            h.serving.abort("c")
            await h.inbox.expect("c").wait()
            await h.settle()
            assert msgspec.structs.asdict(gen.params)["max_tokens"] == 16  # the client's message is untouched

    run(main())
