"""Settings that must agree across hosts, compared wherever `manage.py check` runs.

A fleet configures each process type apart (a web Deployment, a worker Deployment per queue
group, beat), and one of them can end up with another visibility timeout, lease or sweep
timing than the rest: Redis then gives a running task to a second worker after the shortest
visibility timeout any consumer has, and a sweeper judges jobs lost by its own clock settings.
Nothing fails at start; jobs run twice or wait weeks later. So each worker (its sweeper thread,
at every sweep) and each beat (at every leader or standby announcement) record their values in
one Redis hash, one field per process with the time; `check_fleet_settings` (jobs.W020) reads
the fresh ones and names every setting whose values differ, with who holds which.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import redis
from django.conf import settings

from jobs.conf import jobs_settings

FLEET_KEY = "jobs:fleet"
#: A record not refreshed for this long belongs to a process that stopped: ignored, then removed.
#: Workers record theirs at every sweep (15 s), beats every minute; a stopping beat removes its own.
STALE_AFTER = 180.0
#: Settings only some process types use: compared only among those (and the process checking).
USED_BY = {"JOBS_BEAT_LOCK_TTL": {"beat"}, "visibility_timeout": {"worker"}}


def fleet_settings() -> dict[str, Any]:
    """This process's values of what must agree across the fleet, by the setting's name."""
    values: dict[str, Any] = {
        "JOBS_LEASE_SECONDS": float(jobs_settings.LEASE_SECONDS),
        "JOBS_LEDGER_LOST_AFTER": float(jobs_settings.LEDGER_LOST_AFTER),
        "JOBS_LEDGER_MISSING_GRACE": float(jobs_settings.LEDGER_MISSING_GRACE),
        "JOBS_BEAT_LOCK_TTL": float(jobs_settings.BEAT_LOCK_TTL),
        "TIME_ZONE": str(settings.TIME_ZONE),
    }
    if jobs_settings.broker_is_redis:
        values["visibility_timeout"] = jobs_settings.visibility_timeout
    return values


def _field(role: str) -> str:
    return f"{role} {socket.gethostname()} pid {os.getpid()}"


def fleet_publish(role: str, client: redis.Redis) -> None:
    """Records this process's values under `role` (`worker`, `beat`): those its role uses."""
    values = {name: value for name, value in fleet_settings().items() if role in USED_BY.get(name, {role})}
    client.hset(FLEET_KEY, _field(role), json.dumps({"at": time.time(), "settings": values}))


def fleet_forget(role: str, client: redis.Redis) -> None:
    """Removes this process's record (it is stopping): a rollout leaves no stale values behind."""
    client.hdel(FLEET_KEY, _field(role))


def fleet_read(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """The fresh records, by process; stale ones are removed."""
    fresh: dict[str, dict[str, Any]] = {}
    for raw_field, raw in client.hgetall(FLEET_KEY).items():
        try:
            field = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
            record = json.loads(raw)
            if time.time() - float(record["at"]) < STALE_AFTER:
                fresh[field] = dict(record["settings"])
                continue
        except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
            pass
        client.hdel(FLEET_KEY, raw_field)
    return fresh


def fleet_contradictions(
    records: Mapping[str, Mapping[str, Any]], here: Mapping[str, Any], *, here_name: str = "here"
) -> dict[str, dict[str, list[str]]]:
    """Each setting whose values differ among `records` and `here`: {setting: {value: [who]}}
    (values as text, holders in order). A setting a record lacks is not compared for it."""
    holders: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for who, values in [(here_name, here), *sorted(records.items())]:
        for name, value in values.items():
            holders[name][json.dumps(value)].append(who)
    return {name: dict(by_value) for name, by_value in holders.items() if len(by_value) > 1}
