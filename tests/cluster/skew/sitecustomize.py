"""A host whose clock is off: loaded by every Python process started with this directory on
PYTHONPATH (tests/cluster), it shifts `time.time()` and `datetime.now()` by CLOCK_SKEW_SECONDS,
as a host whose NTP failed would. The database's clock (NOW()) is the machine's.
"""

import datetime as _dt
import os
import time as _time

_SKEW = float(os.environ.get("CLOCK_SKEW_SECONDS") or 0)
if _SKEW:
    _real_time, _real_time_ns = _time.time, _time.time_ns
    _time.time = lambda: _real_time() + _SKEW
    _time.time_ns = lambda: _real_time_ns() + int(_SKEW * 1e9)
    _delta = _dt.timedelta(seconds=_SKEW)
    _Real = _dt.datetime

    class _SkewedDatetime(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            real = _Real.now(tz) + _delta
            return cls.combine(real.date(), real.timetz()) if tz is not None else cls.combine(real.date(), real.time())

        @classmethod
        def utcnow(cls):
            real = _Real.utcnow() + _delta
            return cls.combine(real.date(), real.time())

    _dt.datetime = _SkewedDatetime
