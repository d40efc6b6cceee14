"""PROXY protocol headers to backends: the spec's bytes, and a real peer that reads them."""
import socket
from pathlib import Path

import pytest

from harness import free_port, https_get, wait_until
from test_proxy import make_config, stats

from sniproxy.proxy_protocol import header


def test_v1_is_the_spec_example():
    assert header("v1", ("192.168.0.1", 56324), ("192.168.0.11", 443)) == \
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert header("v1", ("2001:db8::1", 1, 0, 0), ("2001:db8::2", 443, 0, 0)) == \
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1 443\r\n"
    assert header("v1", ("::ffff:10.0.0.1", 5, 0, 0), ("10.0.0.2", 6)) == b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n"


def test_v2_layout_with_the_authority_tlv():
    got = header("v2", ("192.168.0.1", 56324), ("192.168.0.11", 443), "example.com")
    assert got[:12] == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"        # the signature
    assert got[12:16] == b"\x21\x11\x00\x1a"          # v2 PROXY, TCP over IPv4, 12 + 3 + 11 bytes
    assert got[16:28] == bytes([192, 168, 0, 1, 192, 168, 0, 11]) + (56324).to_bytes(2, "big") + \
        (443).to_bytes(2, "big")
    assert got[28:] == b"\x02\x00\x0bexample.com"    # PP2_TYPE_AUTHORITY
    six = header("v2", ("2001:db8::1", 1, 0, 0), ("2001:db8::2", 2, 0, 0))
    assert six[12:16] == b"\x21\x21\x00\x24" and len(six) == 16 + 36


@pytest.mark.parametrize("mode", ["off", pytest.param("require", marks=pytest.mark.bpf)])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_haproxy_reads_the_client_address_and_name(proxy, backends, haproxy, pin_path, version, mode):
    """HAProxy with accept-proxy in front of the TLS backend logs the address of the
    client that connected to sniproxy (and, from v2, the name it asked for)."""
    a = backends("a")
    hp_port, port = free_port(), free_port()
    peer = haproxy("peer", f"frontend fe\n  bind 127.0.0.1:{hp_port} accept-proxy\n"
                           f'  log-format "client=%ci:%cp dst=%fi:%fp authority=%[fc_pp_authority]"\n'
                           f"  default_backend be\nbackend be\n  server s1 {a.address}\n", (hp_port,))
    proxy(make_config(port, [("example.com", f"127.0.0.1:{hp_port}")], mode=mode, pin_path=pin_path,
                      bpf="handoff_bytes = 0\nhandoff_after = 0.0\n").replace(
        f'backend = "127.0.0.1:{hp_port}"', f'backend = "127.0.0.1:{hp_port}"\nproxy_protocol = "{version}"'),
        wait_ports=(port,))
    source = ("127.0.0.2", free_port("127.0.0.2"))
    assert https_get(port, "example.com", source=source) == "backend=a\n"
    wait_until(lambda: any(line.startswith("client=") for line in peer.lines()), what="haproxy's log line")
    line = next(line for line in peer.lines() if line.startswith("client="))
    fields = dict(field.split("=", 1) for field in line.split())
    assert fields["client"] == "%s:%d" % source              # not sniproxy's own address
    assert fields["dst"] == f"127.0.0.1:{port}"               # the address the client connected to
    assert fields["authority"] == ("example.com" if version == "v2" else "-")


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_from_haproxy_through_sniproxy_to_haproxy_the_backend_sees_the_client(proxy, backends, haproxy, tmp_path, send):
    """Client -> HAProxy (an L4 balancer, send-proxy) -> sniproxy (accept_proxy) ->
    HAProxy (accept-proxy) -> TLS backend: the last one logs the real client's address,
    and sniproxy's access log names it too."""
    a = backends("a")
    lb_port, port, edge_port = free_port(), free_port(), free_port()
    edge = haproxy("edge", f"frontend fe\n  bind 127.0.0.1:{edge_port} accept-proxy\n"
                           f'  log-format "client=%ci:%cp"\n  default_backend be\n'
                           f"backend be\n  server s1 {a.address}\n", (edge_port,))
    access_log = tmp_path / "access.log"
    p = proxy(make_config(port, [("example.com", f"127.0.0.1:{edge_port}")], extra=f'[log]\naccess = "{access_log}"\n')
              .replace(f'backend = "127.0.0.1:{edge_port}"', f'backend = "127.0.0.1:{edge_port}"\nproxy_protocol = "v2"')
              .replace('fallback = ""', 'fallback = ""\naccept_proxy = true\ntrusted_sources = ["127.0.0.1/32"]'),
              wait_ports=())
    haproxy("lb", f"frontend fe\n  bind 127.0.0.1:{lb_port}\n  default_backend be\n"
                  f"backend be\n  server s1 127.0.0.1:{port} {send}\n", (lb_port,))
    client = ("127.0.0.3", free_port("127.0.0.3"))
    assert https_get(lb_port, "example.com", source=client) == "backend=a\n"
    source = "%s:%d" % client
    wait_until(lambda: any(line.startswith("client=") for line in edge.lines()), what="the edge's log line")
    assert [line for line in edge.lines() if line.startswith("client=")] == [f"client={source}"]
    wait_until(lambda: f"client={source} " in access_log.read_text(), what="sniproxy's access log line")
    counters = stats(p)
    assert counters["refused_proxy_malformed"] == 0 and counters["refused_proxy_untrusted"] == 0


def test_a_proxy_header_that_is_untrusted_malformed_or_missing_is_refused(proxy, backends):
    a = backends("a")
    port, other = free_port(), free_port()
    config = make_config(port, [("example.com", a.address)]).replace(
        'fallback = ""', 'fallback = ""\naccept_proxy = true\ntrusted_sources = ["127.0.0.1/32"]')
    config += (f'[[listener]]\naddress = "127.0.0.1:{other}"\naccept_proxy = true\n'
               'trusted_sources = ["10.0.0.0/8"]\n')
    p = proxy(config, wait_ports=())
    hello = (Path(__file__).parent / "fixtures/hellos/curl.bin").read_bytes()
    for target, data in ((other, header("v1", ("198.18.0.9", 1), ("127.0.0.1", other)) + hello),  # untrusted
                         (port, b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n" + hello),              # bad port
                         (port, hello)):                                                          # missing
        with socket.create_connection(("127.0.0.1", target), timeout=5) as s:
            s.sendall(data)
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass      # closed with the hello unread: a reset is a close too
    wait_until(lambda: stats(p)["refused_proxy_untrusted"] == 1 and stats(p)["refused_proxy_malformed"] == 2,
               what="the refusals counted")
    assert a.accepted == 0
