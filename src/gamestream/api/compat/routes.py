"""Every vendor protocol's routes, for the collector's app (`gamestream.api.app`)."""

from __future__ import annotations

from starlette.routing import BaseRoute

from gamestream.api.compat import amplitude, posthog, segment, snowplow

ROUTES: list[BaseRoute] = [*amplitude.ROUTES, *segment.ROUTES, *posthog.ROUTES, *snowplow.ROUTES]
