"""The embedded broker's in-process command path: the gate's order and hand-over, and PUBACKs that
leave only when acknowledged, in arrival order."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Sequence

from bridge.inprocess_transport import AckAfterCommit, CommandGate, _Pending
from bridge.transport import Command


class Listener:
    def __init__(self) -> None:
        self.connected_calls = 0
        self.bursts: list[list[str]] = []
        self.commands: list[Command] = []
        self.got = asyncio.Event()

    def connected(self) -> None:
        self.connected_calls += 1

    def disconnected(self, error: str) -> None:  # pragma: no cover - never called in-process
        raise AssertionError(error)

    def received(self, commands: Sequence[Command]) -> None:
        self.bursts.append([c.payload.decode() for c in commands])
        self.commands.extend(commands)
        self.got.set()


def test_the_gate_takes_only_the_bridges_command_topics() -> None:
    gate = CommandGate("chat/v1")
    assert gate.wants("chat/v1/users/alice/commands/send-message")
    assert gate.wants("chat/v1/users//commands/x")  # `+` matches an empty level: the bridge ignores it
    assert not gate.wants("chat/v1/users/alice/inbox")
    assert not gate.wants("chat/v1/users/alice/commands")
    assert not gate.wants("chat/v1/users/alice/commands/a/b")
    assert not gate.wants("other/users/alice/commands/send-message")


def test_commands_before_the_pipeline_wait_and_come_in_order_in_one_burst() -> None:
    async def main() -> Listener:
        gate, listener = CommandGate("p"), Listener()
        for n in range(3):
            gate.offer(f"p/users/u/commands/c{n}", str(n).encode(), None)
        gate.attach(listener)
        assert listener.connected_calls == 1 and not listener.bursts  # handed over on the next iteration
        await asyncio.wait_for(listener.got.wait(), 1)
        gate.offer("p/users/u/commands/c3", b"3", None)
        gate.offer("p/users/u/commands/c4", b"4", None)
        listener.got.clear()
        await asyncio.wait_for(listener.got.wait(), 1)
        return listener

    listener = asyncio.run(main())
    assert listener.bursts == [["0", "1", "2"], ["3", "4"]]


def test_a_pipeline_on_another_loop_gets_the_commands_and_acks_run_on_the_brokers_loop() -> None:
    gate, listener = CommandGate("p"), Listener()
    attached, acked_on = threading.Event(), []
    pipeline_loop = asyncio.new_event_loop()

    async def pipeline() -> None:
        gate.attach(listener)
        attached.set()
        await asyncio.wait_for(listener.got.wait(), 5)
        listener.commands[0].ack()

    thread = threading.Thread(target=lambda: pipeline_loop.run_until_complete(pipeline()))
    thread.start()
    assert attached.wait(5)

    async def broker() -> None:
        done = asyncio.Event()

        def ack() -> None:
            acked_on.append(threading.current_thread() is threading.main_thread())
            done.set()

        gate.offer("p/users/u/commands/c", b"x", ack)
        await asyncio.wait_for(done.wait(), 5)

    asyncio.run(broker())
    thread.join(5)
    pipeline_loop.close()
    assert acked_on == [True]


class Writer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass


def test_pubacks_leave_only_when_acknowledged_and_in_arrival_order() -> None:
    async def main() -> bytes:
        handler = AckAfterCommit.__new__(AckAfterCommit)
        # only what the acknowledgement path uses
        handler._unacked, handler._pubacks, handler._writing = deque(), [], False
        handler._write_lock = asyncio.Lock()
        handler.writer = Writer()
        first, second, third = (_Pending(handler, pid) for pid in (7, 8, 9))
        handler._unacked.extend([first, second, third])
        second()  # committed first, but 7 has not been: nothing leaves
        await asyncio.sleep(0)
        assert handler.writer.data == b""
        first()  # 7 and 8 leave, in one write
        await asyncio.sleep(0)
        third()
        third()  # twice: once
        for _ in range(3):
            await asyncio.sleep(0)
        return bytes(handler.writer.data)

    assert asyncio.run(main()) == b"\x40\x02\x00\x07" + b"\x40\x02\x00\x08" + b"\x40\x02\x00\x09"


def test_the_gate_holds_a_bounded_number_of_commands_and_drops_the_connections_beyond() -> None:
    """Before the pipeline attaches the gate used to keep every command: now at most `max_buffered`
    (and `max_bytes`); one more is neither kept nor acknowledged, and its connection is dropped, so
    the client sends it again after reconnecting. Nothing acknowledged is lost."""

    class Transport:
        aborted = 0

        def abort(self) -> None:
            self.aborted += 1

    async def main() -> tuple[Listener, list[Transport], list[_Pending]]:
        gate, listener = CommandGate("p", max_buffered=3, max_bytes=1000), Listener()
        transports, pendings = [], []
        for n in range(5):
            handler = AckAfterCommit.__new__(AckAfterCommit)
            handler._unacked, handler._pubacks, handler._writing = deque(), [], False
            transport = Transport()
            handler.writer = type("Adapter", (), {"_writer": type("W", (), {"transport": transport})()})()
            pending = _Pending(handler, n + 1)
            handler._unacked.append(pending)
            transports.append(transport)
            pendings.append(pending)
            gate.offer(f"p/users/u/commands/c{n}", str(n).encode(), pending)
        gate.offer("p/users/v/commands/big", b"x" * 1001, None)  # over the bytes: not kept either
        assert gate.refused == 3
        gate.attach(listener)
        await asyncio.wait_for(listener.got.wait(), 1)
        return listener, transports, pendings

    listener, transports, pendings = asyncio.run(main())
    assert listener.bursts == [["0", "1", "2"]]
    assert [t.aborted for t in transports] == [0, 0, 0, 1, 1]
    assert not any(p.acked for p in pendings)
