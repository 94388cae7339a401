"""Attacks on the embedded broker's in-process commands (a client's acknowledgement waits for the
bridge's commit), with real clients against `chat-bridge serve`."""

from __future__ import annotations

from pathlib import Path

from test_embedded_ack import crash_before_commit


def test_a_qos2_command_acknowledged_survives_a_crash(tmp_path: Path) -> None:
    """A command published at QoS 2 is completed (PUBREC, PUBCOMP) only once committed: a client told
    it was received never sends it again, so a crash before the commit must not have told it so. amqtt
    sent PUBREC on reading the PUBLISH and PUBCOMP once it was routed, before the commit."""
    crash = crash_before_commit(tmp_path, qos=2, client_msg_id="c-2")
    assert crash.told_after, "the command was never completed after the restart"
    assert crash.bodies.count("kept?") == 1, (
        f"completed before the crash: {crash.told_before}; stored after it: {crash.bodies}"
    )
    assert not crash.told_before, "a QoS 2 command was completed before its commit"
