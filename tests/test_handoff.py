"""The supervisor-to-worker hand-off header: every endpoint survives the trip exactly.

The header travels between our own processes, but a wrong byte would serve a client as
someone else (the limits, rules and logs of the worker all see these endpoints), so the
codec is checked on every shape an endpoint takes, and a cut header is refused.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netserver.endpoint import Endpoint, unmap
from netserver.modes.handoff import (
    HandoffError,
    decode_conn,
    decode_endpoints,
    encode_conn,
    encode_endpoints,
)

_ports = st.one_of(st.none(), st.integers(0, 65535))
_ip_ends = st.builds(
    lambda ip, port: Endpoint(ip=unmap(ip), port=port),
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    _ports,
)
_path_ends = st.builds(
    lambda raw: Endpoint(path=raw.decode("utf-8", "surrogateescape")),
    st.binary(max_size=108),
)
_ends = st.one_of(_ip_ends, _path_ends, st.just(Endpoint()))


@given(st.integers(0, 2**64 - 1), st.text(max_size=40), _ends, _ends)
def test_a_connection_header_decodes_to_what_was_encoded(
    cid: int, service: str, peer: Endpoint, local: Endpoint
) -> None:
    assert decode_conn(encode_conn(cid, service, peer, local)) == (cid, service, peer, local)


@given(_ends, _ends)
def test_endpoints_alone_decode_to_what_was_encoded(peer: Endpoint, local: Endpoint) -> None:
    assert decode_endpoints(encode_endpoints(peer, local)) == (peer, local)


def test_accepted_addresses_keep_their_text_and_family() -> None:
    """What the accept path builds (IPv4, IPv6, an abstract unix name) comes out the same."""
    peer4 = Endpoint.from_sockaddr(socket.AF_INET, ("192.0.2.7", 40001))
    local6 = Endpoint.from_sockaddr(socket.AF_INET6, ("2001:db8::1", 25, 0, 0))
    abstract = Endpoint.from_sockaddr(socket.AF_UNIX, b"\0leafmail\xff")
    cid, service, peer, local = decode_conn(encode_conn(7, "submission", peer4, local6))
    assert (cid, service, str(peer), str(local)) == (
        7,
        "submission",
        "192.0.2.7:40001",
        "[2001:db8::1]:25",
    )
    assert isinstance(local.ip, ipaddress.IPv6Address)
    assert decode_endpoints(encode_endpoints(abstract, peer4)) == (abstract, peer4)


@given(_ends, _ends, st.data())
def test_a_cut_or_extended_header_is_refused(
    peer: Endpoint, local: Endpoint, data: st.DataObject
) -> None:
    whole = encode_conn(1, "smtp", peer, local)
    cut = data.draw(st.integers(0, len(whole) - 1))
    with pytest.raises(HandoffError):
        decode_conn(whole[:cut])
    with pytest.raises(HandoffError):
        decode_conn(whole + b"-")
