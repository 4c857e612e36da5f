"""One logging setup for the CLI, the jobs and the Ray workers, and the one place secrets are
redacted (``redact``): log lines, job summaries and error records all go through it."""
from __future__ import annotations

import logging
import os
import re
from typing import Any

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Names whose value is a credential: the name ends with one of these words (so "tokens: 500",
# "local_tokens" or an S3 object's "key" are left alone, while AWS_SECRET_ACCESS_KEY,
# aws_session_token, X-Amz-Security-Token, RAY_AUTH_TOKEN, password are caught).
_SECRET_WORDS = (r"secret|secret[_-]?access[_-]?key|secret[_-]?key|access[_-]?key(?:[_-]?id)?|api[_-]?key|apikey"
                 r"|private[_-]?key|token|password|passwd|credentials?")
_NAME = rf"[\w.-]*?(?:{_SECRET_WORDS})(?![\w-])"
# NAME=value, NAME: value, 'NAME': 'value', "NAME": "value", NAME='value' (dict and JSON reprs,
# keyword arguments, headers, query strings). The value is quoted (up to its closing quote,
# escapes allowed) or bare (up to whitespace, a quote, or the end of a container/field).
_ASSIGNMENT = re.compile(
    rf"""(?ix)
    (?P<name>['"]?{_NAME}['"]?)
    (?P<sep>\s*[:=]\s*)
    (?:(?P<q>['"])(?P<quoted>(?:\\.|(?!(?P=q)).)*)(?P=q)
      |(?P<bare>[^\s'",;&}}\])]+))
    """)
# An environment variable holding a credential (its value is redacted wherever it appears).
SECRET_ENV_NAME = re.compile(r"(?i)secret|token|password|passwd|credential|(?:^|_)[a-z]*key(?:_|$|id)")
# Shorter values are not credentials anyone issues (AWS keys are 20-40 characters), and replacing
# them would mangle ordinary words in every log line.
_MIN_LITERAL = 8
MASK = "***"


def _secret_values() -> list[str]:
    values = {v for k, v in os.environ.items() if len(v) >= _MIN_LITERAL and SECRET_ENV_NAME.search(k)}
    return sorted(values, key=len, reverse=True)  # a value containing another goes first


def _mask_assignment(m: re.Match) -> str:
    if m.group("q"):
        return f"{m.group('name')}{m.group('sep')}{m.group('q')}{MASK}{m.group('q')}"
    return f"{m.group('name')}{m.group('sep')}{MASK}"


def redact(text: str) -> str:
    """``text`` with every credential replaced by ``***``: values assigned to secret-looking names
    (``key=value``, ``key: value``, quoted dict and JSON reprs) and the literal values of this
    process's secret environment variables (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, ...), so a
    secret printed without its name is caught too."""
    if not text:
        return text
    for value in _secret_values():
        if value in text:
            text = text.replace(value, MASK)
    return _ASSIGNMENT.sub(_mask_assignment, text)


def redact_obj(obj: Any) -> Any:
    """``redact`` applied to every string in a JSON-like structure (a job summary, an error
    record); a value under a secret-looking key is masked whole."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(k, str) and re.fullmatch(_NAME, k, re.I) and v not in (None, "")
                    else redact_obj(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


class RedactingFormatter(logging.Formatter):
    """Redacts the final text of a record: the message with its arguments, the exception's
    traceback and the stack, whatever object reprs they contain."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: str | int | None = None) -> None:
    level = level or os.environ.get("R2F_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    if not any(getattr(h, "_r2f", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(RedactingFormatter(_FORMAT))
        handler._r2f = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "numcodecs", "fsspec", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def setup_worker_logging() -> None:
    """Ray's ``worker_process_setup_hook`` (pipeline.cluster): every task and actor process logs
    through the same redacting handler. Warnings and errors only, as Ray workers printed before
    (their output is streamed to the driver), unless R2F_WORKER_LOG_LEVEL says otherwise."""
    setup_logging(os.environ.get("R2F_WORKER_LOG_LEVEL", "WARNING"))


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
