"""Credentials out of text: the one rule applied wherever an error or a log record becomes text.

botocore puts the whole request URL into connection errors, and a presigned URL carries the access
key id, the signature and the session token in its query string; debug logs print request headers.
``redact`` drops those query parameters, blanks those header values, and blanks every literal
credential value it is told about or finds in the environment. It runs on error paths and on emitted
log records only: a successful transfer never pays for it.

    >>> redact("GET http://s3/b/k?X-Amz-Credential=AKIA1234%2Fus&X-Amz-Signature=ab12&x=1")
    'GET http://s3/b/k?x=1'
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

REDACTED = "REDACTED"
# Environment variables whose values are secrets of the standard AWS credential chain.
SECRET_ENVIRONMENT = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# A value shorter than this is a placeholder ("x", "test"), and blanking it everywhere would garble text.
_MIN_SECRET_LENGTH = 4
_NAMES = r"X-Amz-Credential|X-Amz-Signature|X-Amz-Security-Token|AWSAccessKeyId|Signature|Credential"
# name=value as a query parameter (or a word): dropped whole, with its "&", so no "Signature=" is left.
_QUERY_SECRET = re.compile(rf"(?im)(?:(?<=[?&\s\"'])|^)(?:{_NAMES})=[^&\s\"'<>]*&?")
# The value of name%3Dvalue (a URL inside another), name: value and 'name': b'value' (header dumps,
# botocore's "Signature:\n..." debug line).
_NAMED_SECRET = re.compile(rf"(?i)\b({_NAMES})(%3D|['\"]?\s*:\s*b?['\"]?)[^&\s\"',;]+")
# The whole value of an Authorization header: SigV2's "AWS KEYID:SIGNATURE" has no name=value form.
_AUTHORIZATION = re.compile(r"(?i)\b(Authorization)(['\"]?\s*[:=]\s*b?['\"]?)[^'\"\r\n]+")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with signed-URL credentials, authorization headers and known secret values blanked.

    Args:
        text: Any text: an error message, a traceback, a log line.
        secrets: Literal values to blank besides those of ``SECRET_ENVIRONMENT`` (e.g. the access
            key, secret key and token of a client's credentials). None and short values are ignored.
    Returns:
        The text with each secret replaced by ``REDACTED``.
    """
    text = _AUTHORIZATION.sub(rf"\1\2{REDACTED}", text)
    text = _QUERY_SECRET.sub("", text)
    text = _NAMED_SECRET.sub(rf"\1\2{REDACTED}", text)
    values = {*secrets, *(os.environ.get(name) for name in SECRET_ENVIRONMENT)}
    # Longest first, so that a secret containing another is blanked whole.
    for value in sorted((v for v in values if v and len(v) >= _MIN_SECRET_LENGTH), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """A handler filter that redacts each record's message and traceback before it is formatted."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def redact_logs(logger: logging.Logger | None = None) -> None:
    """Add a ``RedactingFilter`` to every handler of ``logger`` (the root logger by default), once each.

    Handler filters see records propagated from every child logger (botocore's included), which a
    filter on the logger itself would not. ``logging.lastResort`` (warnings with no handler) gets one too.
    """
    handlers = [*(logger or logging.getLogger()).handlers, logging.lastResort]
    for handler in handlers:
        if handler is not None and not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
