"""Routing: a requested name to a backend, through a listener's ordered table."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .config import Config, HostPort, RouteConfig, parse_hostport


@dataclass(frozen=True, slots=True)
class Route:
    pattern: str
    backend: HostPort      # host "*" means: resolve the requested name itself
    matches: Callable[[str], bool]

    @property
    def resolves_requested_name(self) -> bool:
        return self.backend.host == "*"


def compile_matcher(pattern: str) -> Callable[[str], bool]:
    """Names arrive normalized (lower-case, no trailing dot)."""
    if pattern.startswith("~"):
        return re.compile(pattern[1:], re.IGNORECASE).fullmatch
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        suffix = pattern[1:]                      # ".example.com": any subdomain, not the apex
        return lambda name: name.endswith(suffix)
    return pattern.__eq__


def compile_route(route: RouteConfig) -> Route:
    return Route(route.match, parse_hostport(route.backend), compile_matcher(route.match))


class Router:
    """The compiled tables of one config; the first matching route wins."""

    def __init__(self, cfg: Config):
        self.tables = {name: tuple(map(compile_route, routes)) for name, routes in cfg.table.items()}

    def lookup(self, table: str, name: str) -> Route | None:
        for route in self.tables[table]:
            if route.matches(name):
                return route
        return None
