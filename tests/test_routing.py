"""Router.choose on configs as the operator writes them: which backend a first flight goes to, or why not."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sniproxy import config
from sniproxy.config import HostPort
from sniproxy.firstflight import FirstFlight, normalize_name
from sniproxy.routing import Choice, Refusal, Router

NO_SNI = FirstFlight(None, (), "no_sni")
IP_LITERAL = FirstFlight(None, (), "ip_literal")
NOT_TLS = FirstFlight(None, (), "not_tls")
NOT_HTTP = FirstFlight(None, (), "not_http")


def router_for(routes, fallback: str = "", protocol: str = "tls") -> tuple[Router, config.ListenerConfig]:
    """A one-listener config with the routes of its default table, in order."""
    text = f'[[listener]]\naddress = "127.0.0.1:8443"\nprotocol = "{protocol}"\nfallback = "{fallback}"\n'
    text += "".join(f"[[table.default]]\nmatch = '{m}'\nbackend = '{b}'\n" for m, b in routes)
    cfg = config.load(text=text)
    return Router(cfg), cfg.listener[0]


def choose(routes, name: str | None, fallback: str = ""):
    router, listener = router_for(routes, fallback)
    return router.choose(listener, FirstFlight(name) if name else NO_SNI)


def routed_to(choice) -> str | None:
    """The backend a Choice names ("host:port"), None for a Refusal."""
    return str(choice.backend) if isinstance(choice, Choice) else None


def test_exact_match_to_an_ip_backend():
    assert choose([("example.com", "192.0.2.1:443")], "example.com") == \
        Choice(HostPort("192.0.2.1", 443), "192.0.2.1", public_only=False, fallback=False)
    assert choose([("example.com", "192.0.2.1:443")], "www.example.com") == Refusal("no_route", "www.example.com")


def test_named_backend_connects_to_its_own_name_without_the_public_only_rule():
    assert choose([("example.com", "app.internal:8443")], "example.com") == \
        Choice(HostPort("app.internal", 8443), "app.internal", False, False)


@pytest.mark.parametrize("name, routed", [
    ("a.example.com", True), ("deep.sub.example.com", True),
    ("example.com", False),            # the apex is not a subdomain
    ("badexample.com", False), ("a.example.com.evil", False),
])
def test_wildcard_matches_subdomains_only(name, routed):
    got = choose([("*.example.com", "192.0.2.1:443")], name)
    assert got == (Choice(HostPort("192.0.2.1", 443), "192.0.2.1", False, False) if routed
                   else Refusal("no_route", name))


@pytest.mark.parametrize("name, routed", [
    ("api7.test", True), ("api42.test", True),
    ("api.test", False), ("xapi7.test", False), ("api7.test.evil", False),   # a full match, not a search
])
def test_regex_must_match_the_whole_name(name, routed):
    assert (routed_to(choose([(r"~api[0-9]+\.test", "192.0.2.1:443")], name)) == "192.0.2.1:443") == routed


def test_first_matching_route_wins():
    exact, wild = ("a.example.com", "192.0.2.1:443"), ("*.example.com", "192.0.2.2:443")
    assert routed_to(choose([exact, wild], "a.example.com")) == "192.0.2.1:443"
    assert routed_to(choose([wild, exact], "a.example.com")) == "192.0.2.2:443"
    assert routed_to(choose([exact, wild], "b.example.com")) == "192.0.2.2:443"


@pytest.mark.parametrize("pattern", ["Example.COM", "EXAMPLE.com.", "*.Example.Com", r"~EX[a-z]*\.Example\.COM"])
def test_patterns_are_case_insensitive(pattern):
    # Names arrive normalized (lower case, no trailing dot): the pattern's case must not matter.
    name = "example.com" if not pattern.startswith(("*", "~")) else "ex.example.com"
    assert routed_to(choose([(pattern, "192.0.2.1:443")], name)) == "192.0.2.1:443"


def test_star_backend_resolves_the_requested_name_public_only():
    assert choose([("*.example.com", "*:443")], "shop.example.com") == \
        Choice(HostPort("*", 443), "shop.example.com", public_only=True, fallback=False)


@pytest.mark.parametrize("flight", [FirstFlight("unknown.test"), NO_SNI, IP_LITERAL, NOT_TLS],
                         ids=["no_route", "no_sni", "ip_literal", "not_tls"])
def test_fallback_takes_no_route_no_name_and_not_protocol(flight):
    router, listener = router_for([("example.com", "192.0.2.1:443")], fallback="192.0.2.9:8443")
    assert router.choose(listener, flight) == Choice(HostPort("192.0.2.9", 8443), "192.0.2.9", False, True)
    # A route still wins over the fallback.
    assert router.choose(listener, FirstFlight("example.com")).fallback is False


@pytest.mark.parametrize("flight, refusal", [
    (FirstFlight("unknown.test"), Refusal("no_route", "unknown.test")),
    (NO_SNI, Refusal("no_name", "no_sni")),
    (IP_LITERAL, Refusal("no_name", "ip_literal")),
    (NOT_TLS, Refusal("not_protocol", "not_tls")),
    (NOT_HTTP, Refusal("not_protocol", "not_http")),
], ids=["no_route", "no_sni", "ip_literal", "not_tls", "not_http"])
def test_refusal_reasons_without_a_fallback(flight, refusal):
    router, listener = router_for([("example.com", "192.0.2.1:443")])
    assert router.choose(listener, flight) == refusal


def test_star_fallback_needs_a_name():
    router, listener = router_for([("example.com", "192.0.2.1:443")], fallback="*:443")
    assert router.choose(listener, NO_SNI) == Refusal("no_name", "no_sni")
    assert router.choose(listener, NOT_TLS) == Refusal("not_protocol", "not_tls")
    assert router.choose(listener, FirstFlight("other.test")) == \
        Choice(HostPort("*", 443), "other.test", public_only=True, fallback=True)


def test_two_listeners_keep_their_own_tables_and_fallbacks():
    cfg = config.load(text="""
        [[listener]]
        address = "127.0.0.1:443"
        table = "public"
        fallback = "192.0.2.9:443"
        [[listener]]
        address = "[::1]:443"
        table = "internal"
        [[table.public]]
        match = "*.example.com"
        backend = "192.0.2.1:443"
        [[table.internal]]
        match = "*.example.com"
        backend = "[2001:db8::1]:8443"
        [[table.internal]]
        match = "intranet.test"
        backend = "192.0.2.3:443"
    """)
    router, (public, internal) = Router(cfg), cfg.listener
    assert routed_to(router.choose(public, FirstFlight("a.example.com"))) == "192.0.2.1:443"
    assert router.choose(internal, FirstFlight("a.example.com")) == \
        Choice(HostPort("2001:db8::1", 8443), "2001:db8::1", False, False)
    # intranet.test is only in the internal table; the public listener falls back.
    assert routed_to(router.choose(internal, FirstFlight("intranet.test"))) == "192.0.2.3:443"
    assert router.choose(public, FirstFlight("intranet.test")).fallback is True
    assert router.choose(internal, FirstFlight("other.test")) == Refusal("no_route", "other.test")


# --- properties -------------------------------------------------------------------

_LABEL = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9-]{0,20}", fullmatch=True)
_LAST = st.from_regex(r"[a-zA-Z][a-zA-Z0-9-]{0,10}", fullmatch=True)   # a numeric last label is an IP
HOST_NAMES = st.builds(lambda labels, last: ".".join([*labels, last]), st.lists(_LABEL, max_size=4), _LAST)
PROPERTY = settings(max_examples=150, deadline=None)


@PROPERTY
@given(HOST_NAMES)
def test_an_exact_star_route_resolves_the_name_itself_case_folded(pattern):
    """The pattern in any case routes the normalized name, and "*" connects to that very name."""
    name, problem = normalize_name(pattern)
    assert problem == ""
    assert choose([(pattern, "*:443")], name) == Choice(HostPort("*", 443), pattern.lower(), True, False)


@PROPERTY
@given(HOST_NAMES, HOST_NAMES)
def test_a_wildcard_takes_every_subdomain_and_never_its_apex(sub, apex):
    apex = apex.lower()
    router, listener = router_for([(f"*.{apex}", "192.0.2.1:443")])
    full = normalize_name(f"{sub}.{apex}")[0]
    if full is not None:       # too long for a DNS name: the parser never hands it over
        assert routed_to(router.choose(listener, FirstFlight(full))) == "192.0.2.1:443"
    assert router.choose(listener, FirstFlight(apex)) == Refusal("no_route", apex)


def test_alpn_routes_send_acme_challenges_to_the_responder():
    """A route with alpn takes only a hello that offers one of its protocols: the
    TLS-ALPN-01 case, acme-tls/1 to the responder and the rest to the web server."""
    router = Router(config.load(text='[[table.default]]\nmatch = "example.com"\nbackend = "127.0.0.1:1"\n'
                                     'alpn = ["acme-tls/1"]\n'
                                     '[[table.default]]\nmatch = "example.com"\nbackend = "127.0.0.1:2"\n'))
    listener = config.load(text="").listener[0]
    assert router.choose(listener, FirstFlight("example.com", ("acme-tls/1",))).backend.port == 1
    assert router.choose(listener, FirstFlight("example.com", ("h2", "http/1.1"))).backend.port == 2
    assert router.choose(listener, FirstFlight("example.com")).backend.port == 2
    with pytest.raises(config.ConfigError, match=r"alpn\[0\] = ''"):
        config.load(text='[[table.default]]\nmatch = "a.test"\nbackend = "127.0.0.1:1"\nalpn = [""]\n')
