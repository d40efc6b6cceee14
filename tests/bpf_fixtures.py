"""Fixtures for tests that pin BPF objects: import the ones you use into the test module."""
import pytest

from sniproxy import bpfload
from sniproxy.kernel_abi import map_sizes


@pytest.fixture
def relay_pins(pin_path):
    """The relay loaded and pinned at pin_path; unpinned afterwards."""
    loaded = bpfload.load(pin_path, programs=("relay",), cflags=map_sizes(max_pairs=512, dns_cache_size=1024))
    try:
        yield loaded
    finally:
        loaded.unpin()
