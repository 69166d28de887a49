"""``PipeChannel`` driven directly on a real pipe: what its callers see when it closes."""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import threading

from llm_server.common.channel import LinkedChannel, PipeChannel

BIG = 20 * 1024 * 1024  # far over a socket buffer: its send blocks until the other end reads


def test_closing_while_the_sender_thread_sends_raises_nothing() -> None:
    """Scenario:
    1. a channel on one end of a real pipe; the other end reads nothing, so a 20 MB send blocks
       in the sender thread; one awaited send and one ``send_soon`` queue behind it;
    2. the other end stops writing (half-close): the channel's reader sees EOF and the channel
       closes while the big send is still being written;
    3. the pipe is not closed under that send (before, it was: a send could fail half-way or
       write into whatever file got the descriptor next); once the other end reads, the big
       message arrives whole and its ``send`` says True;
    4. the sends queued behind it, and one made after the close, say False or drop the message;
       none raises; then the pipe closes and the other end sees EOF.
    """
    ours, theirs = multiprocessing.get_context("spawn").Pipe(duplex=True)

    async def scenario() -> None:
        closed = asyncio.Event()
        channel = PipeChannel(ours, asyncio.get_running_loop(), lambda message: None, closed.set, "test")
        channel.start()
        big = asyncio.ensure_future(channel.send(b"x" * BIG))
        await asyncio.sleep(0.2)
        assert not big.done()  # blocked: nobody reads
        queued = asyncio.ensure_future(channel.send("queued"))
        await asyncio.sleep(0)
        channel.send_soon("queued too")
        peer = socket.socket(fileno=theirs.fileno())
        peer.shutdown(socket.SHUT_WR)
        peer.detach()
        await asyncio.wait_for(closed.wait(), 10)
        assert channel.closed and not ours.closed  # the send in progress still has its pipe
        received = await asyncio.to_thread(theirs.recv)
        assert received == b"x" * BIG
        assert await asyncio.wait_for(big, 10) is True
        assert await asyncio.wait_for(queued, 10) is False
        assert await channel.send("after the close") is False
        channel.send_soon("after the close too")
        assert await asyncio.to_thread(theirs.poll, 10)
        try:
            leftover = theirs.recv()
        except EOFError:
            leftover = None
        assert leftover is None  # nothing was sent after the close, and the pipe is closed
        assert ours.closed

    asyncio.run(scenario())
    assert not [t for t in threading.enumerate() if t.name.startswith("test-")]
    theirs.close()


def test_a_new_link_ends_the_previous_channel_and_messages_name_theirs() -> None:
    """Scenario:
    1. a ``LinkedChannel`` linked to pipe A; a message on A reaches ``on_message`` with A's channel;
    2. linked to pipe B while A is still open: ``on_gone`` runs for A at once (its requests end),
       and B becomes current; a message on B names B's channel;
    3. B's other end closes: ``on_gone`` runs for B.
    """
    ctx = multiprocessing.get_context("spawn")
    a_ours, a_theirs = ctx.Pipe(duplex=True)
    b_ours, b_theirs = ctx.Pipe(duplex=True)

    async def scenario() -> None:
        got: asyncio.Queue[tuple[str, object, object]] = asyncio.Queue()
        linked = LinkedChannel(
            lambda message, channel: got.put_nowait(("message", message, channel)),
            lambda channel: got.put_nowait(("gone", None, channel)),
            "test",
        )
        loop = asyncio.get_running_loop()
        linked.link(a_ours, loop)
        first = linked.current
        a_theirs.send("hello from A")
        assert await asyncio.wait_for(got.get(), 5) == ("message", "hello from A", first)
        linked.link(b_ours, loop)
        second = linked.current
        assert second is not first
        assert await asyncio.wait_for(got.get(), 5) == ("gone", None, first)
        b_theirs.send("hello from B")
        assert await asyncio.wait_for(got.get(), 5) == ("message", "hello from B", second)
        b_theirs.close()
        assert await asyncio.wait_for(got.get(), 5) == ("gone", None, second)
        a_theirs.close()

    asyncio.run(scenario())
