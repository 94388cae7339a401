"""The bridge's ids (`service.new_id`): the protocol's shape, and never the same twice, across
threads and across a fork."""

from __future__ import annotations

import os
import re
import threading

import pytest

from bridge.service import new_id

SHAPE = re.compile(r"m_[A-Za-z0-9_-]{16}")


def test_ids_have_the_prefix_and_sixteen_url_safe_characters_and_do_not_repeat() -> None:
    ids = [new_id("m") for _ in range(20_000)]
    assert all(SHAPE.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert new_id("conv").startswith("conv_") and len(new_id("v")) == 18


def test_threads_never_share_ids() -> None:
    found: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        out.extend(new_id("m") for _ in range(5_000))

    threads = [threading.Thread(target=make, args=(out,)) for out in found]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for out in found for i in out]
    assert len(set(every)) == len(every) == 20_000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_does_not_repeat_its_parents_next_ids() -> None:
    new_id("m")  # the parent holds ids it has not handed out yet
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, " ".join(new_id("m") for _ in range(50)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = set(pipe.read().decode().split())
    os.waitpid(pid, 0)
    parent = {new_id("m") for _ in range(50)}
    assert len(child) == 50 and not child & parent
