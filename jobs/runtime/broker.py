"""The broker connection as every process of the site uses it.

kombu's Redis channel builds a new `redis.Redis` object for every command it sends outside the
consumer's loop (`Channel.conn_or_acquire`): each publish (the queue's binding lookup, the LPUSH,
a task event's PUBLISH) and each delivery's and acknowledgement's bookkeeping. With redis-py 5
and later, that constructor copies its table of 170 response callbacks into a case-insensitive
dict: about 0.2 ms of CPU, several times per task, paid by the worker's main process (which does
every broker round trip for its pool) and by beat in a burst of sends. `reuse_redis_clients`
makes each channel build that object once per connection pool and reuse it: a `redis.Redis`
holding a `ConnectionPool` is safe to share between threads (each command takes a connection
from the pool), and the pool itself, kombu's own, is unchanged; a channel that reconnects gets a
new pool and with it a new client. The consumer's asynchronous client is left as kombu makes it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_installed = False
_lock = threading.Lock()


def reuse_redis_clients() -> None:
    """Installs the per-channel client cache into kombu's Redis transport (once per process)."""
    global _installed
    with _lock:
        if _installed:
            return
        try:
            from kombu.transport import redis as kombu_redis
        except ImportError:  # redis-py absent: a site on RabbitMQ only
            return

        channel: Any = kombu_redis.Channel  # _create_client is private: not in kombu's stubs
        build = channel._create_client

        def _create_client(self: Any, asynchronous: bool = False) -> Any:
            if asynchronous:
                return build(self, asynchronous=True)
            pool = self.pool
            cached = self.__dict__.get("_jobs_client")
            if cached is None or cached.connection_pool is not pool:
                cached = build(self)
                self.__dict__["_jobs_client"] = cached
            return cached

        _create_client.__wrapped__ = build  # type: ignore[attr-defined]  # for a reader (and the test)
        channel._create_client = _create_client
        _installed = True


#: Below this many messages a batch is not worth a connection of its own: opening one costs about
#: 3.5 ms of CPU (connect, PING, a client and its pool), what pipelining saves on some 30 LPUSHes
#: (measured: 16 publishes 5.5 ms pooled, 7.0 ms on their own pipelined connection; 32: 9.8 and
#: 8.9 ms; 64: 20.5 and 13.8 ms). Beat's steady ticks of a few sends stay on the pooled producer.
PIPELINE_MIN_MESSAGES = 32


@contextmanager
def producer_for(app: Any, count: int, *, retry_policy: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    """A producer for `count` publishes of ledger jobs, and the kombu publish batch they go into
    (None: each publish is sent at once, as Celery sends it).

    kombu pipelines a Redis producer's publishes inside `Producer.batch()` (one round trip for
    the lot, where each LPUSH otherwise waits for its own answer), but only on a connection
    whose client never retries a command: a pipeline retried after a timeout may have run
    already, and its messages would go out twice. The site's broker options retry on timeout
    (`retry_on_timeout`), so a batch of many gets a connection of its own without that retry.
    A copy a failed flush may still have delivered is harmless here: a ledger job starts once
    whatever number of copies reach the workers (its start lease), and a flush that fails
    leaves its rows unpublished for the relay. `retry_policy` bounds how long its connection is
    tried for (the relay's and the requeue's callers must not hang on a dead broker). Transports
    kombu cannot batch (RabbitMQ's pyamqp) and small counts use the app's pooled producer."""
    if count >= PIPELINE_MIN_MESSAGES:
        connection = app.connection_for_write(transport_options={**retry_policy, "retry_on_timeout": False})
        try:
            pipelines = bool(getattr(connection.transport.implements, "batch_publish", False))
            if pipelines:
                producer = app.amqp.Producer(connection, auto_declare=False)
                pipelines = producer.supports_batch_publish
            if pipelines:
                # No automatic flush in between: the caller's flush (the batch's exit) is where
                # the broker's answer, and with it each row's fate, is known.
                with producer.batch(max_size=1_000_000) as batch:
                    yield producer, batch
                return
        finally:
            connection.release()
    with app.producer_or_acquire() as producer:
        yield producer, None
