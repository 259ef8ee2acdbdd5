"""kombu's Redis channel keeps one client per connection pool (`jobs.runtime.broker`)."""

from __future__ import annotations

import json

from kombu.transport import redis as kombu_redis

from config.celery import app
from jobs.runtime.broker import reuse_redis_clients


def test_the_cache_is_installed_once_by_the_app():
    installed = kombu_redis.Channel._create_client
    assert hasattr(installed, "__wrapped__")  # JobsConfig.ready() put it there
    reuse_redis_clients()
    assert kombu_redis.Channel._create_client is installed  # not wrapped twice


def test_one_client_per_channel_and_pool_and_publishes_still_arrive(redis_client):
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        first = channel._create_client()
        assert channel._create_client() is first
        with app.producer_or_acquire() as producer:
            for n in range(3):
                producer.publish({"n": n}, routing_key="low", exchange="", serializer="json")
        assert channel._create_client() is first
        assert channel._create_client(asynchronous=True) is not first  # the consumer's own
        assert channel._create_client(asynchronous=True) is not channel._create_client(asynchronous=True)
    bodies = [json.loads(raw)["body"] for raw in redis_client.lrange("low", 0, -1)]
    assert len(bodies) == 3


def test_a_channel_that_reconnects_gets_a_client_of_its_new_pool(redis_client):
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        old = channel._create_client()
        channel._disconnect_pools()  # what kombu does when the connection is lost
        new = channel._create_client()
        assert new is not old
        assert new.connection_pool is channel.pool
        assert new.ping()


def test_channels_do_not_share_a_client(redis_client):
    with app.connection_for_write() as one, app.connection_for_write() as two:
        a, b = one.default_channel, two.default_channel
        assert a._create_client() is not b._create_client()
        assert a._create_client().connection_pool is a.pool
