import shutil
from pathlib import Path

import pytest

from harness import Backend, Haproxy, Proxy, make_cert, tcp_pair, unique


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture
def backends(cert):
    """backends("a", "b") -> TLS backends on loopback, closed after the test."""
    made = []

    def make(*labels, host="127.0.0.1", greeting=b""):
        new = [Backend(label, host=host, greeting=greeting, cert=cert) for label in labels]
        made.extend(new)
        return new if len(new) > 1 else new[0]

    yield make
    for b in made:
        b.close()


@pytest.fixture
def haproxy(tmp_path):
    """haproxy(name, config, ports) -> a real HAProxy (harness.Haproxy), stopped after the test."""
    made = []

    def make(name, config, ports):
        directory = tmp_path / name
        directory.mkdir()
        made.append(Haproxy(directory, config, ports))
        return made[-1]

    yield make
    for h in made:
        h.close()


@pytest.fixture
def plain():
    """plain("label", greeting=b"") -> a plain TCP backend, closed after the test."""
    made = []

    def make(label, **kw):
        made.append(Backend(label, **kw))
        return made[-1]

    yield make
    for b in made:
        b.close()


def _remove_pins(path: str) -> None:
    from sniproxy import bpfload
    bpfload.unpin(path)
    shutil.rmtree(path, ignore_errors=True)   # and whatever a crashed master left unlisted


@pytest.fixture(scope="session", autouse=True)
def stale_pins_swept():
    """Pin directories of test processes that were killed outright (no finally ran) go
    before this run starts: their names carry the pid that made them."""
    from sniproxy import bpfload
    bpfload.remove_orphaned("sniproxy-test")


@pytest.fixture
def pin_path():
    """A bpffs directory of this test's own; removed even when the test fails."""
    path = str(Path("/sys/fs/bpf") / unique("sniproxy-test"))
    try:
        yield path
    finally:
        _remove_pins(path)


@pytest.fixture
def proxy(tmp_path):
    """proxy(config_text) -> a started master (stopped and killed after the test)."""
    made = []

    def make(config: str, start: bool = True, **kw):
        p = Proxy(tmp_path, config, name=f"proxy{len(made)}")
        made.append(p)
        return p.start(**kw) if start else p

    yield make
    for p in made:
        p.stop(timeout=10)


@pytest.fixture(autouse=True)
def _bpf_available(request):
    """BPF tests fail, never skip, where the kernel or privileges do not allow them."""
    if request.node.get_closest_marker("bpf") is None:
        return
    from sniproxy import bpfload
    problems = bpfload.probe("/sys/fs/bpf/sniproxy-probe").problems()
    if problems:
        pytest.fail("BPF is unavailable here: " + "; ".join(problems), pytrace=False)


@pytest.fixture(params=["c", "python"])
def pairs_in(request, monkeypatch):
    """Which pairs the copy and splice relays make: setup.py builds copypair, so "c" must be there."""
    from sniproxy import userspace_relay
    if request.param == "c":
        assert userspace_relay.copypair is not None, "sniproxy/copypair.c is not built (scripts/setup builds it)"
        assert userspace_relay.UserspaceRelay()._copier is not None
    monkeypatch.setattr(userspace_relay.UserspaceRelay, "compiled", request.param == "c")
    return request.param


@pytest.fixture
def pair():
    """(client, c, u, server), loopback TCP: a relay moves bytes between c and u."""
    client, c = tcp_pair()
    u, server = tcp_pair()
    yield client, c, u, server
    for s in (client, c, u, server):
        s.close()
