"""kombu's Redis transport, with channels that outlive their connection being closed.

When Redis goes away, kombu closes the transport and forgets its client; an acknowledgement
still pending on the event loop, or a channel closed during the consumer's restart, then builds
a connection pool from that client and dies of AttributeError("'NoneType' object has no
attribute 'hostname'"). That is not one of the connection errors a worker recovers from, so the
worker stopped for good (celery/kombu#582, celery/celery#9250). Here the same moment raises
redis's ConnectionError: the worker logs it and reconnects like after any other broker loss.
Used for redis:// (see app.core.celery.transport).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise RedisConnectionError("the broker connection was closed")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[misc]


class Transport(kombu_redis.Transport):
    Channel = Channel
