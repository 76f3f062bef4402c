"""The amplitude protocol (being written: see docs/compat.md)."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []
