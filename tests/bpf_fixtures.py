"""Fixtures for tests that pin BPF objects: import the ones you use into the test module."""
import pytest

from sniproxy import bpfload


@pytest.fixture
def relay_pins(pin_path):
    """The relay loaded and pinned at pin_path; unpinned afterwards."""
    loaded = bpfload.load(pin_path, programs=("relay",), cflags={"SOCK_MAP_MAX": 1024, "CONNECTION_MAP_MAX": 1024})
    try:
        yield loaded
    finally:
        loaded.unpin()
