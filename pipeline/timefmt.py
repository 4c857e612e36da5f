"""The one timestamp format of records the pipeline writes (manifests, markers, infos.json):
UTC, second precision, ISO 8601 with a ``Z`` (``2024-05-01T12:00:00Z``), so records from
machines in different time zones compare as strings."""
from __future__ import annotations

import time

UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_stamp(t: float | None = None) -> str:
    """``t`` (seconds since the epoch; default now) as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return time.strftime(UTC_FORMAT, time.gmtime(t))


def utc_now() -> str:
    """Now, as ``utc_stamp``."""
    return utc_stamp()
