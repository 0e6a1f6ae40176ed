"""privsep.Announcer: new queue ids reach the queue manager, one datagram per loop turn.

A group commit answers a whole batch of sessions in one turn of the worker's loop; the
ids they announce must travel together, so the queue manager wakes once per batch,
and none may be lost or mixed up on the way.
"""

from __future__ import annotations

import asyncio
import socket

from leafmail.privsep import ANNOUNCE_BATCH, Announcer
from leafmail.spool import new_id


def _datagrams(announcer: Announcer) -> list[bytes]:
    """Each datagram waiting on the receiving end, as sent."""
    found = []
    while True:
        try:
            found.append(announcer.receiver.recv(65536, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return found


def test_ids_of_one_loop_turn_travel_in_one_datagram() -> None:
    announcer = Announcer()
    ids = [new_id() for _ in range(5)]

    async def one_turn() -> list[bytes]:
        for qid in ids:
            announcer.announce(qid)
        assert _datagrams(announcer) == []  # nothing before the turn ends
        await asyncio.sleep(0)
        return _datagrams(announcer)

    sent = asyncio.run(one_turn())
    assert len(sent) == 1
    announcer.receiver.setblocking(False)
    for data in sent:
        announcer.sender.send(data)
    assert announcer.receive() == ids


def test_a_full_batch_goes_at_once_and_the_rest_at_the_end_of_the_turn() -> None:
    announcer = Announcer()
    ids = [new_id() for _ in range(ANNOUNCE_BATCH + 3)]

    async def one_turn() -> int:
        for qid in ids:
            announcer.announce(qid)
        early = len(_datagrams(announcer))
        await asyncio.sleep(0)
        return early + len(_datagrams(announcer))

    assert asyncio.run(one_turn()) == 2
    assert announcer.dropped == 0


def test_every_id_arrives_in_order_through_receive() -> None:
    announcer = Announcer()
    ids = [new_id() for _ in range(2 * ANNOUNCE_BATCH + 7)]

    async def turns() -> None:
        for i, qid in enumerate(ids):
            announcer.announce(qid)
            if i % 50 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(turns())
    assert announcer.receive() == ids


def test_off_a_loop_an_id_goes_at_once() -> None:
    announcer = Announcer()
    qid = new_id()
    announcer.announce(qid)
    assert announcer.receive() == [qid]
