"""SPF macro expansion and record parsing (no DNS): RFC 7208 7.4 examples."""

from __future__ import annotations

import ipaddress

import pytest

from slimta.util._spf_eval import SpfError, _expand, _parse, _State

SENDER = "strong-bad@email.example.com"
DOMAIN = "email.example.com"


def state(ip: str = "192.0.2.3") -> _State:
    return _State(ipaddress.ip_address(ip), SENDER, "mx.example.org", deadline=0.0)


@pytest.mark.parametrize(
    ("macro", "expanded"),
    [
        ("%{s}", "strong-bad@email.example.com"),
        ("%{o}", "email.example.com"),
        ("%{d}", "email.example.com"),
        ("%{d4}", "email.example.com"),
        ("%{d3}", "email.example.com"),
        ("%{d2}", "example.com"),
        ("%{d1}", "com"),
        ("%{dr}", "com.example.email"),
        ("%{d2r}", "example.email"),
        ("%{l}", "strong-bad"),
        ("%{l-}", "strong.bad"),
        ("%{lr}", "strong-bad"),
        ("%{lr-}", "bad.strong"),
        ("%{l1r-}", "strong"),
        ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
        ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
        ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
        ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
        ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
        ("%{h}", "mx.example.org"),
        ("%{p}", "unknown"),
        ("%%%_%-", "% %20"),
        ("%{S}", "strong-bad@email.example.com"),
    ],
)
def test_rfc_examples(macro: str, expanded: str) -> None:
    assert _expand(macro, state(), DOMAIN) == expanded


def test_ipv6_example() -> None:
    assert _expand("%{ir}.%{v}._spf.%{d2}", state("2001:db8::cb01"), DOMAIN) == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
    )


@pytest.mark.parametrize("macro", ["%{c}", "%{t}", "%{r}", "%{x}", "%{d0}", "%x", "%", "%{d"])
def test_bad_macros(macro: str) -> None:
    with pytest.raises(SpfError) as info:
        _expand(macro, state(), DOMAIN)
    assert info.value.result == "permerror"


def test_parse() -> None:
    record = _parse("v=spf1 -ip4:192.0.2.0/24 ~a:a.test/24//64 mx ?all redirect=r.test x=y")
    assert [(d.qualifier, d.name, d.value, d.cidr4, d.cidr6) for d in record.directives] == [
        ("fail", "ip4", "192.0.2.0", 24, 128),
        ("softfail", "a", "a.test", 24, 64),
        ("pass", "mx", None, 32, 128),
        ("neutral", "all", None, 32, 128),
    ]
    assert record.redirect == "r.test"


@pytest.mark.parametrize(
    "text",
    ["v=spf1 ip4", "v=spf1 ip6:::1/129", "v=spf1 a:", "v=spf1 exp=a exp=b", "v=spf1 allx"],
)
def test_parse_errors(text: str) -> None:
    with pytest.raises(SpfError):
        _parse(text)
