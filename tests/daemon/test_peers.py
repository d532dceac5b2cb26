"""PrefillLink against real ZeroMQ sockets on loopback: a prefill instance restarted on a
new port is found again through its run directory, even when the link re-resolved the
directory while the old instance's file was still there."""

from __future__ import annotations

import asyncio

import msgspec
import zmq
import zmq.asyncio

from kvd.daemon.pd.peers import PrefillLink
from kvd.ipc import bind_random, publish_endpoint
from kvd.messages import Pong, ToPrefill


async def answer_pings(sock: zmq.asyncio.Socket, instance: str) -> None:
    dec, enc = msgspec.msgpack.Decoder(ToPrefill), msgspec.msgpack.Encoder()
    while True:
        identity, payload = await sock.recv_multipart()
        ping = dec.decode(payload)
        await sock.send_multipart([identity, enc.encode(Pong(ping.seq, instance, "ns", 0))])


async def pong_within(link: PrefillLink, timeout_s: float) -> Pong | None:
    """Ping once a tick (as the daemon's ticker does) until a Pong arrives."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        link.ping()
        if link.sock is not None:
            try:
                msg = await asyncio.wait_for(link.recv(), 0.2)
            except TimeoutError:
                continue
            if isinstance(msg, Pong):
                link.on_pong(msg)
                return msg
        else:
            await asyncio.sleep(0.2)
    return None


def test_a_restarted_prefill_instance_is_found_again(tmp_path):
    async def main():
        ctx = zmq.asyncio.Context()
        old, new = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
        for s in (old, new):
            s.setsockopt(zmq.LINGER, 0)
        publish_endpoint(tmp_path / "pd_endpoint", bind_random(old))
        serving = asyncio.ensure_future(answer_pings(old, "old"))
        link = PrefillLink(ctx, str(tmp_path))
        try:
            assert (await pong_within(link, 5)).instance == "old" and link.alive
            # The old instance stops answering but its file stays (kill -9, or a shutdown
            # that has not removed it yet); the link declares it dead and re-resolves: the
            # stale endpoint again.
            serving.cancel()
            link.last_pong -= 10
            assert link.expired(3.0) and not link.alive
            link.reset()
            assert await pong_within(link, 1) is None
            # The restarted instance publishes a new port: the link follows it.
            publish_endpoint(tmp_path / "pd_endpoint", bind_random(new))
            serving = asyncio.ensure_future(answer_pings(new, "new"))
            pong = await pong_within(link, 5)
            assert pong is not None and pong.instance == "new" and link.alive
            assert link.endpoint == (tmp_path / "pd_endpoint").read_text().strip()
        finally:
            serving.cancel()
            link.close()
            old.close(linger=0)
            new.close(linger=0)
            ctx.term()

    asyncio.run(asyncio.wait_for(main(), 30))
