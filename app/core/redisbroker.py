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

Used for redis:// (see app.core.celery.transport).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

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
