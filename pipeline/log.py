"""One logging setup for the CLI, the jobs and the Ray workers."""
from __future__ import annotations

import logging
import os
import re

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SECRET = re.compile(r"(?i)(aws_secret_access_key|aws_session_token|secret|password|token)(\s*[=:]\s*)(\S+)")


class _RedactSecrets(logging.Filter):
    """Credentials never reach a log line, even when an exception message carries them."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        redacted = _SECRET.sub(r"\1\2***", msg)
        if redacted != msg:
            record.msg, record.args = redacted, None
        return True


def setup_logging(level: str | int | None = None) -> None:
    level = level or os.environ.get("R2F_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    if not any(getattr(h, "_r2f", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(_RedactSecrets())
        handler._r2f = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "numcodecs", "fsspec", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
