"""Who holds each partition now, as the processors of `demo --cluster` see it: the leases in the KV bucket
`<pipeline>-ownership` (keys `partitions.<p>`, each value the holder's `{"member", "host", "pid"}`; see
`gamestream.log.ownership.LeaseOwnership`). Read-only: the demo never writes a lease."""

from __future__ import annotations

import asyncio
import json

from gamestream.log.ownership import bucket_name, nats_servers


class LeaseView:
    """A connection of its own to the cluster, opened on first use and kept (it reconnects by itself)."""

    def __init__(self, url: str, *, pipeline: str, partitions: int) -> None:
        self.servers = nats_servers(url)
        self.bucket = bucket_name(pipeline)
        self.partitions = partitions
        self._nc = None
        self._kv = None

    async def holders(self, timeout: float = 2.0) -> dict[int, int | None] | None:
        """Partition → the pid holding its lease (None: free); None when the cluster cannot say now."""
        try:
            return await asyncio.wait_for(self._holders(), timeout)
        except Exception:
            return None

    async def _holders(self) -> dict[int, int | None]:
        import nats
        import nats.js.errors

        if self._nc is None:
            async def quiet(*_: object) -> None:
                return None

            self._nc = await nats.connect(servers=self.servers, name="gamestream-demo-leases", connect_timeout=1,
                                          max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=quiet,
                                          disconnected_cb=quiet, reconnected_cb=quiet, closed_cb=quiet)
        if self._kv is None:
            self._kv = await self._nc.jetstream(timeout=1.0).key_value(self.bucket)
        found: dict[int, int | None] = {}
        for partition in range(self.partitions):
            try:
                entry = await self._kv.get(f"partitions.{partition}")
            except nats.js.errors.KeyNotFoundError:
                found[partition] = None
                continue
            try:
                found[partition] = int(json.loads(entry.value or b"{}").get("pid"))
            except (ValueError, TypeError):
                found[partition] = None
        return found

    async def close(self) -> None:
        if self._nc is not None:
            try:
                await asyncio.wait_for(self._nc.close(), 2.0)
            except Exception:
                pass
            self._nc = None
