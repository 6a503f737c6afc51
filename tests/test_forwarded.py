"""Reading a proxy's Forwarded / X-Forwarded-For headers (ws_gym.forwarded): no I/O."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from ws_gym.forwarded import MAX_FORWARDED_ADDRESS, forwarded_client


@pytest.mark.parametrize("headers, client", [
    ({}, None),
    ({"Host": "x"}, None),
    ({"X-Forwarded-For": "203.0.113.7"}, "203.0.113.7"),
    ({"X-Forwarded-For": "203.0.113.7, 10.0.0.1"}, "203.0.113.7"),  # the first hop is the client
    ({"X-Forwarded-For": "203.0.113.7:5555"}, "203.0.113.7"),
    ({"X-Forwarded-For": "2001:db8::7"}, "2001:db8::7"),  # a bare IPv6 address has no port
    ({"Forwarded": "for=192.0.2.60;proto=https;by=203.0.113.43"}, "192.0.2.60"),
    ({"Forwarded": 'For="[2001:db8:cafe::17]:4711"'}, "2001:db8:cafe::17"),
    ({"Forwarded": 'proto=https;for="a;b,c", for=192.0.2.1'}, "unknown"),  # quoted ; and , kept in one value
    ({"Forwarded": "by=203.0.113.43, for=198.51.100.17"}, "198.51.100.17"),
    ({"Forwarded": "proto=https"}, "unknown"),  # a proxy, but no client named
    ({"Forwarded": "for=unknown"}, "unknown"),
    ({"X-Forwarded-For": "<script>"}, "unknown"),  # not address-shaped: never logged as given
    ({"X-Forwarded-For": "1" * (MAX_FORWARDED_ADDRESS + 1)}, "unknown"),
    ({"X-Forwarded-For": "\x1b[31m"}, "unknown"),
    ({"Forwarded": "for=192.0.2.9", "X-Forwarded-For": "203.0.113.7"}, "192.0.2.9"),  # the standard first
])
def test_the_forwarded_client(headers, client):
    assert forwarded_client(headers) == client


def test_repeated_headers_and_a_huge_one_are_read_within_bounds():
    headers = CIMultiDict([("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.7")])
    assert forwarded_client(headers) == "198.51.100.1"
    assert forwarded_client({"Forwarded": "x=" + "a" * 10**6 + ";for=192.0.2.1"}) == "unknown"  # past the cap
