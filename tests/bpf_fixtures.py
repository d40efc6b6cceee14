"""Fixtures for tests that pin BPF objects: import the ones you use into the test module."""
import os
import uuid

import pytest

from sniproxy import bpfload


@pytest.fixture
def pin_dir():
    """A bpffs path of this test's own (not created); everything under it is unpinned afterwards."""
    path = f"/sys/fs/bpf/sniproxy-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield path
    finally:
        bpfload.unpin(path)


@pytest.fixture
def relay_pins(pin_dir):
    """The relay loaded and pinned at pin_dir; unpinned afterwards."""
    loaded = bpfload.load(pin_dir, programs=("relay",), cflags={"SOCK_MAP_MAX": 1024, "CONNECTION_MAP_MAX": 1024})
    try:
        yield loaded
    finally:
        loaded.unpin()
