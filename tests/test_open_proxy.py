"""Never an open proxy: where a "*" backend may lead, and no loops into the proxy itself."""
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import Dnsmasq, free_port, https_get
from test_proxy import make_config, stats

from sniproxy import config
from sniproxy.resolver import is_public
from sniproxy.firstflight import FirstFlight
from sniproxy.routing import Refusal, Router

NOT_PUBLIC_V4 = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1", "0.0.0.0", "100.64.0.1",
                 "100.127.255.254", "224.0.0.1", "239.1.1.1", "255.255.255.255", "240.0.0.1", "192.0.2.1",
                 "198.18.0.1", "192.0.0.8"]


@pytest.mark.parametrize("address", NOT_PUBLIC_V4 + [
    "::1", "::", "fe80::1", "fe80::1%lo", "fc00::1", "fd12::1", "ff02::1", "ff0e::1", "2001:db8::1",
    "64:ff9b:1::808:808"])
def test_special_addresses_are_not_public(address):
    assert not is_public(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::8.8.8.8"])
def test_public_addresses_are_public(address):
    assert is_public(address)


@given(v4=st.sampled_from(NOT_PUBLIC_V4), form=st.sampled_from(["::ffff:{}", "::{}", "64:ff9b::{}"]))
def test_a_special_ipv4_address_inside_ipv6_is_not_public(v4, form):
    address = form.format(v4)
    ipaddress.ip_address(address)   # a valid IPv6 literal
    assert not is_public(address), address


@pytest.mark.parametrize(("listen", "backend"), [
    ("127.0.0.1:8443", "127.0.0.1:8443"), ("0.0.0.0:8443", "127.0.0.1:8443"), ("0.0.0.0:8443", "0.0.0.0:8443"),
    ("[::1]:8443", "[::1]:8443"), ("[::]:8443", "[::1]:8443")])
def test_a_backend_on_an_own_listener_is_a_config_error(listen, backend):
    text = f'[[listener]]\naddress = "{listen}"\n[[table.default]]\nmatch = "a.test"\nbackend = "{backend}"\n'
    with pytest.raises(config.ConfigError) as e:
        config.load(text=text)
    assert e.value.problems == [f"table.default[0].backend = {backend!r}: is one of this proxy's own listeners (a loop)"]
    with pytest.raises(config.ConfigError, match="fallback"):
        config.load(text=f'[[listener]]\naddress = "{listen}"\nfallback = "{backend}"\n')


def test_router_knows_its_own_listeners():
    router = Router(config.load(text='[[listener]]\naddress = "127.0.0.1:8443"\n'
                                     '[[listener]]\naddress = "0.0.0.0:7443"\n'))
    assert router.loops_back("127.0.0.1", 8443) and router.loops_back("::ffff:127.0.0.1", 8443)
    assert router.loops_back("127.0.0.1", 7443) and router.loops_back("127.0.0.2", 7443)   # 0.0.0.0: any local
    assert not router.loops_back("127.0.0.1", 8444) and not router.loops_back("198.18.0.1", 7443)


def test_a_star_name_that_resolves_to_the_proxy_itself_is_refused(proxy, tmp_path):
    """Even with allow_private: the proxy never connects to its own listener."""
    port = free_port()
    dns = Dnsmasq(tmp_path, {"self.test": "127.0.0.1"})
    try:
        extra = f'[resolver]\nnameservers = ["127.0.0.1:{dns.port}"]\nallow_private = true\n'
        p = proxy(make_config(port, [("*.test", f"*:{port}")], extra=extra, workers=1), wait_ports=(port,))
        with pytest.raises(OSError):
            https_get(port, "self.test", timeout=5)
        counters = stats(p)
        assert (counters["refused_loop"], counters["accepted"]) == (1, 2)   # the probe and the client
    finally:
        dns.close()


def test_a_mixed_answer_keeps_only_the_public_addresses():
    """Decided without connecting anywhere: Router.permitted filters what a "*" name
    resolved to; a named backend's addresses are the operator's and pass as they are."""
    router = Router(config.load(text='[[table.default]]\nmatch = "*.test"\nbackend = "*:443"\n'))
    star = router.choose(config.load(text="").listener[0], FirstFlight("mixed.test"))
    mixed = ["10.0.0.1", "8.8.8.8", "::ffff:192.168.1.1", "2606:4700::1111", "64:ff9b::a00:1", "100.64.0.9"]
    assert router.permitted(star, mixed, allow_private=False) == ["8.8.8.8", "2606:4700::1111"]
    assert router.permitted(star, mixed, allow_private=True) == mixed
    assert router.permitted(star, ["10.0.0.1"], allow_private=False) == Refusal("private_address", "mixed.test")
    named = Router(config.load(text='[[table.default]]\nmatch = "a.test"\nbackend = "origin.test:443"\n'))
    choice = named.choose(config.load(text="").listener[0], FirstFlight("a.test"))
    assert named.permitted(choice, ["10.0.0.1"], allow_private=False) == ["10.0.0.1"]
