"""kombu's Redis transport, with channels that outlive their connection being closed, and one
Redis client per channel instead of one per command.

When Redis goes away, kombu closes the transport and forgets its client; an acknowledgement
still pending on the event loop, or a channel closed during the consumer's restart, then builds
a connection pool from that client and dies of AttributeError("'NoneType' object has no
attribute 'hostname'"). That is not one of the connection errors a worker recovers from, so the
worker stopped for good (celery/kombu#582, celery/celery#9250). Here the same moment raises
redis's ConnectionError: the worker logs it and reconnects like after any other broker loss.

kombu builds a new `redis.Redis` for every `conn_or_acquire()`: twice per message in a worker's
consumer (the bookkeeping of its emulated acks at delivery, and the ack) and once per publish
batch. Each build copies redis-py's table of ~170 response callbacks into a
CaseInsensitiveDict (redis/redis-py#3624): 15% of a worker consumer's CPU in a profile of a
4,000-task drain. A client holds no connection (each command checks one out of the pool), so
the channel keeps one per pool and hands it out again; a new pool (kombu drops its pools when
the broker connection is lost) gets a new client.

The API publishes from its event loop (app.tasks.publication.Publisher): kombu builds each
message and routes it to its Redis commands (`Channel.collect`), which redis.asyncio then sends
in one pipeline. kombu stays the one that knows the wire format; only the socket is not its.

Used for redis:// (see app.core.celery.transport).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

Command = tuple[str, tuple[Any, ...]]


class Collected:
    """A publish batch (kombu's `Producer.batch` session) that keeps the Redis commands kombu
    routes each message to, instead of sending them: LPUSH to the priority's list, and the
    queue's PEXPIREs where it has an expiry."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.commands: list[Command] = []

    def publish(self, message: Any, **kwargs: Any) -> Any:
        return self.channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))

    def flush(self) -> None:
        """Nothing to send: the caller sends `commands`."""

    def discard(self) -> None:
        self.commands.clear()

    def close(self) -> None:
        """Holds no connection."""


class Channel(kombu_redis.Channel):
    _shared_client: Any = None
    _collected: Collected | None = None

    @contextmanager
    def collect(self) -> Iterator[list[Command]]:
        """Within, a producer's `batch()` on this channel touches no socket: the commands of
        its messages are appended to the list yielded. A producer's `declare=` still would."""
        collected = self._collected = Collected(self)
        try:
            yield collected.commands
        finally:
            self._collected = None

    def create_publish_batch(self, max_size: int) -> Any:
        if self._collected is not None:
            return self._collected
        return super().create_publish_batch(max_size)  # type: ignore[misc]

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise RedisConnectionError("the broker connection was closed")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            # The event loop's clients (BRPOP, fanout pub/sub): kombu keeps each in a cached
            # property already. Publishing and the acks go through the branch below.
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        pool = self.pool
        client = self._shared_client
        if client is None or client.connection_pool is not pool:
            client = self._shared_client = super()._create_client()  # type: ignore[misc]
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel
