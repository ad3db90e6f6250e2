"""The Redis transport's channel: one client per connection pool, messages still acked."""

from __future__ import annotations

from pathlib import Path

from kombu import Connection

from app.core.redisbroker import Transport
from tests.support.services import RedisServer


def _round_trip(connection: Connection, body: dict[str, int]) -> None:
    """A message published, delivered (kombu's unacked bookkeeping) and acked."""
    queue = connection.SimpleQueue("redisbroker-test")
    queue.put(body)
    message = queue.get(timeout=5)
    assert message.payload == body
    message.ack()
    channel = connection.default_channel
    with channel.conn_or_acquire() as client:
        # Both writes of the bookkeeping went through the shared client and are undone.
        assert client.hlen(channel.unacked_key) == 0
        assert client.zcard(channel.unacked_index_key) == 0
        assert client.llen("redisbroker-test") == 0


def test_a_channel_hands_out_one_client_per_pool(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        with Connection(server.url, transport=Transport) as connection:
            channel = connection.default_channel
            with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
                assert first is second
                assert first.connection_pool is channel.pool
            _round_trip(connection, {"n": 1})
            with channel.conn_or_acquire() as after:
                assert after is first

            # kombu drops its pools when the broker connection is lost: the next client is
            # built on the new pool, never left on the old one.
            channel._disconnect_pools()
            with channel.conn_or_acquire() as renewed:
                assert renewed is not first
                assert renewed.connection_pool is channel.pool
            _round_trip(connection, {"n": 2})
    finally:
        server.stop()
