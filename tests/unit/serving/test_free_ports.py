"""The stack's ports come from below the kernel's ephemeral range, so nothing the kernel
hands out in the meantime (an outgoing connection's local port, a vLLM server's port-0
bind) can take one before its component binds it."""

from __future__ import annotations

import socket

from tokentrace.serving.procs import ephemeral_range, free_ports


def test_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    lo, hi = ephemeral_range()
    ports = free_ports(40)
    assert len(set(ports)) == 40
    assert all(1024 <= p < lo for p in ports)
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
