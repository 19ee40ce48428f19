"""DSN requests (RFC 3461) received by the SMTP edge end up on the envelope."""

from __future__ import annotations

import smtplib
from typing import Any

import gevent
import pytest
from gevent.event import Event

from slimta.edge.smtp import SmtpEdge

pytestmark = pytest.mark.timeout(20)


class RecordingQueue:
    def __init__(self) -> None:
        self.envelopes: list[Any] = []
        self.arrived = Event()

    def enqueue(self, envelope: Any) -> list[tuple[Any, str]]:
        self.envelopes.append(envelope)
        self.arrived.set()
        return [(envelope, "dsn-1")]


@pytest.fixture
def edge_port():
    queue = RecordingQueue()
    edge = SmtpEdge(("127.0.0.1", 0), queue, hostname="mx.test")
    edge.start()
    gevent.sleep(0)
    yield edge.server.server_port, queue
    edge.kill()


def test_dsn_parameters_kept_on_the_envelope(edge_port: tuple[int, RecordingQueue]) -> None:
    port, queue = edge_port
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test")
    try:
        client.ehlo()
        assert client.has_extn("dsn")
        client.sendmail(
            "a@example.test",
            ["b@example.test", "c@example.test"],
            b"Subject: dsn\r\n\r\nbody\r\n",
            mail_options=["RET=HDRS", "ENVID=QQ+2B314"],
            rcpt_options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;b+2Bx@example.test"],
        )
    finally:
        client.quit()
    assert queue.arrived.wait(5)
    envelope = queue.envelopes[0]
    assert envelope.dsn_ret == "HDRS"
    assert envelope.dsn_envid == "QQ+314"
    assert envelope.dsn_notify == {
        "b@example.test": ("FAILURE", "DELAY"),
        "c@example.test": ("FAILURE", "DELAY"),
    }
    assert envelope.dsn_orcpt == {
        "b@example.test": "rfc822;b+x@example.test",
        "c@example.test": "rfc822;b+x@example.test",
    }


def test_no_dsn_parameters_leave_the_defaults(edge_port: tuple[int, RecordingQueue]) -> None:
    port, queue = edge_port
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test")
    try:
        client.sendmail("a@example.test", ["b@example.test"], b"Subject: x\r\n\r\nbody\r\n")
    finally:
        client.quit()
    assert queue.arrived.wait(5)
    envelope = queue.envelopes[0]
    assert envelope.dsn_ret is None
    assert envelope.dsn_envid is None
    assert envelope.dsn_notify is None
    assert envelope.dsn_orcpt is None
