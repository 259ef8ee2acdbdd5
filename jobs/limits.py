"""Limits per key, cluster-wide, and unique jobs: how a task declares them (docs/limits.md,
docs/unique-jobs.md).

    from jobs.limits import Limit

    @shared_task(base=JobTask, limits=[
        Limit("customer-sync", concurrency=2, key="{customer_id}"),  # at most 2 running per customer
        Limit("provider-api", rate=10, per=1.0),                     # at most 10 starts a second, all keys
    ])
    def sync_customer(customer_id: int) -> None: ...

A job over one of its limits waits in the job table as `throttled` (no retry spent) and starts as
soon as the limit allows, in order of arrival per key (`jobs.runtime.limits`). Limits of the same
`name` are one limit, shared by every task that names it.

    @shared_task(base=JobTask, unique=UniqueJob(key="invoice:{order_id}"))
    def send_invoice(order_id: int) -> None: ...

makes every `enqueue(send_invoice, args=[42])` a unique enqueue of key "invoice:42".
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
KEY_MAX = 200
#: The attribute of a task that lists its limits (`@shared_task(limits=[...])`).
TASK_ATTRIBUTE = "limits"


class LimitError(ValueError):
    """A limit declared wrongly, or a key its job's arguments cannot give."""


@dataclass(frozen=True)
class Limit:
    """At most `concurrency` runs at once, or at most `rate` starts in any `per` seconds, for each
    key. `key`: a format string over the task's arguments by name (`"{customer_id}"`, or
    `"{0}"` by position), or a callable taking the task's arguments and returning the key; empty:
    one key for all the task's jobs."""

    name: str
    concurrency: int | None = None
    rate: int | None = None
    per: float = 1.0
    key: str | Callable[..., object] = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise LimitError(f"a limit's name is 1 to 100 letters, digits or _.:-, not {self.name!r}")
        if (self.concurrency is None) == (self.rate is None):
            raise LimitError(f"limit {self.name!r}: give one of concurrency= or rate=")
        number = self.concurrency if self.concurrency is not None else self.rate
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise LimitError(f"limit {self.name!r}: the number of jobs is a whole number >= 1, not {number!r}")
        per = self.per
        if isinstance(per, bool) or not isinstance(per, int | float) or not 0 < per <= 86_400:
            raise LimitError(f"limit {self.name!r}: per is seconds, more than 0 and at most a day, not {per!r}")
        if not (isinstance(self.key, str) or callable(self.key)):
            raise LimitError(f"limit {self.name!r}: key is a format string or a callable, not {self.key!r}")

    @property
    def kind(self) -> str:
        return "concurrency" if self.concurrency is not None else "rate"

    @property
    def number(self) -> int:
        return int(self.concurrency if self.concurrency is not None else self.rate or 0)

    def describe(self) -> str:
        if self.concurrency is not None:
            return f"at most {self.concurrency} running per key"
        return f"at most {self.rate} starts per {self.per:g} s per key"

    def key_for(self, args: Sequence[Any], kwargs: Mapping[str, Any], named: Mapping[str, Any]) -> str:
        """The key of one job: `named` holds its arguments by parameter name."""
        return format_key(self.key, args, kwargs, named, what=f"limit {self.name!r}")


def format_key(
    key: str | Callable[..., object],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    named: Mapping[str, Any],
    *,
    what: str,
) -> str:
    """A key from a job's arguments: `key` formatted with them (by position and by name), or
    called with them. A `LimitError` names `what` when they cannot give one."""
    try:
        value = str(key(*args, **kwargs)) if callable(key) else key.format(*args, **named) if key else ""
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"[:200]
        raise LimitError(f"{what}: no key from the job's arguments ({reason})") from exc
    if len(value) > KEY_MAX or "\x00" in value:
        raise LimitError(f"{what}: a key is at most {KEY_MAX} characters, without NUL")
    return value


@dataclass(frozen=True)
class UniqueJob:
    """A task whose jobs are unique by a key from their arguments (`enqueue`'s `unique_key`,
    with the same `unique_for`, `unique_while` and `unique_policy`)."""

    key: str | Callable[..., object]
    unique_for: float | None = None
    unique_while: str = "unfinished"
    unique_policy: str = "return"

    def __post_init__(self) -> None:
        if not (isinstance(self.key, str) and self.key) and not callable(self.key):
            raise LimitError(f"a unique job's key is a format string or a callable, not {self.key!r}")
        seconds = self.unique_for
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0):
            raise LimitError(f"unique_for must be a number of seconds > 0, not {seconds!r}")
        if self.unique_while not in ("unfinished", "queued"):
            raise LimitError(f'unique_while must be "unfinished" or "queued", not {self.unique_while!r}')
        if self.unique_policy not in ("return", "replace", "raise"):
            raise LimitError(f'unique_policy must be "return", "replace" or "raise", not {self.unique_policy!r}')

    def key_for(self, task: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        named = _named_arguments(task, args, kwargs) if isinstance(self.key, str) else kwargs
        return format_key(self.key, args, kwargs, named, what=f"{getattr(task, 'name', task)}: unique key")


def task_unique(task: Any) -> UniqueJob | None:
    """The `UniqueJob` a task declares (`unique=`), if any."""
    declared = getattr(task, "unique", None)
    if declared is None:
        return None
    if not isinstance(declared, UniqueJob):
        raise LimitError(f"{getattr(task, 'name', task)}: unique is a jobs.limits.UniqueJob, not {declared!r}")
    return declared


@dataclass(frozen=True)
class LimitKey:
    """One limit applied to one job: what the start checks and holds."""

    name: str
    key: str
    kind: str
    number: int
    per: float


def task_limits(task: Any) -> tuple[Limit, ...]:
    """The limits `task` declares (checked: a `LimitError` names what is wrong)."""
    declared = getattr(task, TASK_ATTRIBUTE, None)
    if not declared:
        return ()
    if isinstance(declared, Limit):
        declared = (declared,)
    limits = tuple(declared)
    for limit in limits:
        if not isinstance(limit, Limit):
            raise LimitError(f"{getattr(task, 'name', task)}: limits are jobs.limits.Limit, not {limit!r}")
    names = [limit.name for limit in limits]
    if len(set(names)) != len(names):
        raise LimitError(f"{getattr(task, 'name', task)}: a limit is named twice")
    return limits


def limit_keys(task: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[LimitKey]:
    """The limits of one job of `task`, with their keys from its arguments; empty when it has none."""
    limits = task_limits(task)
    if not limits:
        return []
    named: Mapping[str, Any] = kwargs
    if any(isinstance(limit.key, str) and limit.key for limit in limits):
        named = _named_arguments(task, args, kwargs)
    return [
        LimitKey(limit.name, limit.key_for(args, kwargs, named), limit.kind, limit.number, float(limit.per))
        for limit in limits
    ]


def _named_arguments(task: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    # A task that runs another function (a Django task's runner) names it `limits_function`.
    run = getattr(task, "limits_function", None) or getattr(task, "run", None)
    try:
        bound = inspect.signature(run).bind_partial(*args, **kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return kwargs
    bound.apply_defaults()
    return {**bound.arguments, **kwargs}
