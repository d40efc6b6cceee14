from pathlib import Path

import pytest

from sniproxy import config
from sniproxy.config import ConfigError, parse_hostport
from sniproxy.firstflight import FirstFlight
from sniproxy.routing import Router

ROOT = Path(__file__).resolve().parent.parent


def problems(text):
    with pytest.raises(ConfigError) as e:
        config.load(text=text)
    return e.value.problems


def test_empty_file_and_example_are_the_builtin_default():
    assert config.load(text="") == config.load() == config.load(ROOT / "etc/sniproxy.toml")
    cfg = config.load()
    assert cfg.listener[0].address == "127.0.0.1:8443"
    assert cfg.table["default"][0].backend == "127.0.0.1:9443"
    assert cfg.bpf.pin_path == "/sys/fs/bpf/sniproxy"


@pytest.mark.parametrize("text, line", [
    ("[master]\nworkers = 'x'", "master.workers = 'x': Expected int, got str"),
    ("[master]\nwrokers = 2", "master.wrokers = 2: unknown key"),
    ("[bpf]\nmode = 'sometimes'", "bpf.mode = 'sometimes': Invalid enum value 'sometimes'"),
    ("[[listener]]\naddress = '127.0.0.1'", "listener[0].address = '127.0.0.1': expected ip:port"),
    ("[[listener]]\naddress = 'localhost:80'", "listener[0].address = 'localhost:80': expected ip:port"),
    ("[[listener]]\naddress = '[::1]:0'", "listener[0].address = '[::1]:0': expected ip:port"),
    ("[[listener]]\ntable = 'web'", "listener[0].table = 'web': no such table (have: default)"),
    ("[[listener]]\nfallback = 'x'", "listener[0].fallback = 'x': expected host:port"),
    ("[access]\ndeny = ['10.0.0.0/33']", "access.deny[0] = '10.0.0.0/33': not a CIDR"),
    ("[resolver]\nnameservers = ['dns.example']", "resolver.nameservers[0] = 'dns.example': expected"),
    ("[timeouts]\nidle = 0", "timeouts.idle = 0.0: must be positive"),
    ("[timeouts]\nhalf_closed = -1", "timeouts.half_closed = -1.0: must be positive"),
    ("[bpf]\nhandoff_bytes = -1", "bpf.handoff_bytes = -1: must be 0 (at once) or more"),
    ("[bpf]\nhandoff_after = -0.5", "bpf.handoff_after = -0.5: must be 0 (at once) or more"),
    ("[relay]\nwindow = 0", "relay.window = 0.0: must be positive"),
    ("[relay]\nsplice_rate = -5", "relay.splice_rate = -5: must be positive"),
    ("[relay]\nkernel_rate = 40000000", "relay.kernel_rate = 40000000: must be -1 (never) or more, below splice_rate / 2"),
    ("[relay]\nkernel_messages = -1", "relay.kernel_messages = -1: must be 0 (never) or more"),
    ("[bpf]\nbatch_bytes = -1", "bpf.batch_bytes = -1: must be 0 (off) or more"),
    ("[relay]\npolicy = 'fastest'", "relay.policy = 'fastest': Invalid enum value 'fastest'"),
    ("[relay]\ntls_fast_relay = 'copy'", "relay.tls_fast_relay = 'copy': Invalid enum value 'copy'"),
    ("[bpf]\nsteering = 'random'", "bpf.steering = 'random': Invalid enum value 'random'"),
    ("[bpf]\nsteering_backlog = -1", "bpf.steering_backlog = -1: must be 0 to 4294967295"),
    ("[bpf]\nsteering_margin = -5", "bpf.steering_margin = -5: must be 0 to 4294967295"),
    ("[[table.default]]\nmatch = '~a('\nbackend = '1.2.3.4:1'", "table.default[0].match = '~a(': bad regex"),
    ("[[table.default]]\nmatch = 'a b'\nbackend = '1.2.3.4:1'", "table.default[0].match = 'a b': expected a DNS"),
    ("[[table.default]]\nmatch = 'a.test'\nbackend = '*'", "table.default[0].backend = '*': expected host:port"),
    ("[[table.default]]\nmatch = 'a.test'\nbackend = '1.2.3.4:1'\n[[table.web]]\nmatch = 'b.test'\n"
     "backend = '1.2.3.4:1'\nfastopen = 'yes'", "table.web[0].fastopen = 'yes': Expected bool, got str"),
    ("[[table.default]]\nmatch = 'a.test'\nbackend = '1.2.3.4:1'\nproxy_protocol = 'v3'",
     "table.default[0].proxy_protocol = 'v3': Invalid enum value 'v3'"),
    ("[master\n", "TOML syntax"),
])
def test_one_line_errors_name_the_key_and_the_value(text, line):
    found = problems(text)
    assert len(found) == 1 and line in found[0], found


def test_every_semantic_problem_is_reported():
    found = problems("[[listener]]\naddress = 'x'\ntable = 'nope'\n[access]\nallow = ['bad']\n")
    assert len(found) == 3


def test_hostport_forms():
    assert parse_hostport("[::1]:443") == config.HostPort("::1", 443)
    assert parse_hostport("example.com:8443") == config.HostPort("example.com", 8443)
    assert parse_hostport("*:443").host == "*"
    assert parse_hostport("10.0.0.1", default_port=53).port == 53
    assert str(config.HostPort("::1", 5)) == "[::1]:5"
    for bad in ("", "a:b", "[::1]", "1.2.3.4:70000", "[zz]:1"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_routes_match_in_order_case_insensitively():
    cfg = config.load(text="""
[[table.default]]
match = "api.example.com"
backend = "127.0.0.1:1"
[[table.default]]
match = "*.example.com"
backend = "127.0.0.1:2"
[[table.default]]
match = '~(www\\.)?Shop[0-9]+\\.test'
backend = "*:443"
""")
    router = Router(cfg)
    port = lambda name: (r := router.lookup("default", FirstFlight(name))) and r.backend.port
    assert port("api.example.com") == 1               # first match wins over the wildcard
    assert port("x.api.example.com") == 2
    assert port("example.com") is None                 # "*.suffix" is subdomains only
    assert port("badexample.com") is None
    assert port("shop12.test") == 443 and port("www.shop1.test") == 443
    assert port("shop12.test.evil") is None            # regexes match the whole name
    assert router.lookup("default", FirstFlight("shop1.test")).resolves_requested_name
