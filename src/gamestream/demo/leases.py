"""Who holds each partition now, as the processors of `demo --cluster` see it: the leases in the KV bucket
`<pipeline>-ownership` (keys `partitions.<p>`, each value the holder's `{"member", "host", "pid"}`; see
`gamestream.log.ownership.LeaseOwnership`) on NATS (`LeaseView`), the consumer group's assignment on Kafka
(`GroupView`). Read-only: the demo never writes a lease nor joins the group."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

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



class GroupView:
    """The same view on a Kafka log (`demo --cluster --log kafka`): the members of the consumer group
    `<pipeline>.<topic>.processors` (`gamestream.log.kafka_group`) and the partitions assigned to each; a member's
    pid is in its client id (`gamestream-<host>-<pid>-<random>`).

    The admin requests run in a small child process of their own (`python -m gamestream.demo.leases`), which
    prints the assignment every TICK_S: librdkafka's admin client can abort the whole process when the group's
    coordinator broker dies during a request (`rd_kafka_enq_once_del_source_return: Assertion`, seen with
    confluent-kafka 2.16.1 when a broker is killed) — a child that dies so is started again, and the demo goes on."""

    TICK_S = 1.0

    def __init__(self, url: str, *, pipeline: str, partitions: int) -> None:
        self.args = [sys.executable, "-m", "gamestream.demo.leases", url, pipeline, str(partitions)]
        self._child: subprocess.Popen | None = None
        self._latest: tuple[float, dict[int, int | None] | None] = (0.0, None)
        self._lock = threading.Lock()

    async def holders(self, timeout: float = 2.0) -> dict[int, int | None] | None:
        """Partition → the pid of the member assigned it (None: no member has it); None when the cluster cannot
        say now (no broker answers, the group is rebalancing, the child has just been restarted)."""
        if self._child is None or self._child.poll() is not None:
            self._start()
        with self._lock:
            at, found = self._latest
        return found if time.monotonic() - at <= 3 * self.TICK_S + timeout else None

    def _start(self) -> None:
        # its own session: a Ctrl-C in the demo's terminal does not end it (`close` does; so does the demo's
        # end, which closes the pipe it prints to)
        self._child = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        threading.Thread(target=self._read, args=(self._child,), name="group-view", daemon=True).start()

    def _read(self, child: subprocess.Popen) -> None:
        for line in child.stdout:  # type: ignore[union-attr]
            try:
                found = json.loads(line)
            except ValueError:
                continue
            parsed = None if found is None else {int(p): pid for p, pid in found.items()}
            with self._lock:
                self._latest = (time.monotonic(), parsed)

    async def close(self) -> None:
        child, self._child = self._child, None
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                await asyncio.to_thread(child.wait, 5)
            except subprocess.TimeoutExpired:
                child.kill()


def _describe_forever(url: str, pipeline: str, partitions: int) -> None:
    """The child of `GroupView`: the group's assignment as one JSON line every TICK_S (null when it cannot be
    read now), until stdin's reader (the demo) is gone."""
    from confluent_kafka.admin import AdminClient

    from gamestream.log.kafka import LogUrl, client_config
    from gamestream.log.kafka_group import processors_group

    parsed = LogUrl.parse(url)
    admin = AdminClient({**client_config(parsed.bootstrap), "client.id": "gamestream-demo-owners",
                         "socket.connection.setup.timeout.ms": 1000, "log_level": 0})
    group_id = processors_group(pipeline, parsed.topic)
    while True:
        found: dict[int, int | None] | None = None
        try:
            group = admin.describe_consumer_groups([group_id], request_timeout=2.0)[group_id].result(timeout=3.0)
            if str(group.state).rsplit(".", 1)[-1] in ("STABLE", "EMPTY"):  # not mid-rebalance
                found = {partition: None for partition in range(partitions)}
                for member in group.members:
                    try:
                        pid = int(member.client_id.rsplit("-", 2)[-2])
                    except (ValueError, IndexError):
                        continue
                    for assigned in member.assignment.topic_partitions if member.assignment else []:
                        if assigned.topic == parsed.topic and assigned.partition in found:
                            found[assigned.partition] = pid
        except Exception:
            found = None
        try:
            print(json.dumps(found), flush=True)
        except BrokenPipeError:
            return
        time.sleep(GroupView.TICK_S)


if __name__ == "__main__":
    _describe_forever(sys.argv[1], sys.argv[2], int(sys.argv[3]))
