"""occ_core.redact: signed-URL credentials, authorization headers and secret values out of text.

.venv/bin/python -m pytest tests/unit/test_redact.py -q
"""

from __future__ import annotations

import logging

import pytest

from occ_core.redact import REDACTED, RedactingFilter, redact

KEY_ID, SECRET, TOKEN = "AKIAFAKEKEYID123456", "fakeSecretAccessKey0123456789abcdef", "FAKESESSIONTOKEN0123"


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)


def assert_clean(text: str) -> None:
    for word in (KEY_ID, SECRET, TOKEN, "Signature=", "X-Amz-Credential=", "AWSAccessKeyId="):
        assert word not in text, f"{word!r} left in {text!r}"


@pytest.mark.parametrize(
    "text",
    [
        # SigV2 presigned GET, as botocore's EndpointConnectionError prints it
        f'Could not connect to the endpoint URL: "http://127.0.0.1:9/b/k?AWSAccessKeyId={KEY_ID}'
        f'&Signature=vIqn%2Bep%3D&x-amz-security-token={TOKEN}&Expires=1796285015"',
        # SigV4 presigned GET
        f"GET https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={KEY_ID}"
        f"%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600"
        f"&X-Amz-SignedHeaders=host&X-Amz-Security-Token={TOKEN}&X-Amz-Signature=0123abcd",
        # botocore's debug dump of a header-signed request
        f"headers={{'X-Amz-Security-Token': b'{TOKEN}', 'Authorization': b'AWS4-HMAC-SHA256 "
        f"Credential={KEY_ID}/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=ab12'}}",
        f"'Authorization': b'AWS {KEY_ID}:c2lnbmF0dXJl'",  # SigV2 header
        "Signature:\n0123456789abcdef0123456789abcdef",  # botocore.auth's debug line
        f"a secret in any words: {SECRET}",
    ],
    ids=["v2-url", "v4-url", "v4-headers", "v2-header", "debug-signature", "literal"],
)
def test_credentials_and_signatures_are_gone(text):
    redacted = redact(text)
    assert_clean(redacted)
    assert "0123456789abcdef0123456789abcdef" not in redacted and "c2lnbmF0dXJl" not in redacted


def test_the_rest_of_a_signed_url_is_kept():
    url = f"http://127.0.0.1:9/b?list-type=2&prefix=obman%2Ftrain%2F&AWSAccessKeyId={KEY_ID}&Signature=x%3D"
    assert redact(url) == "http://127.0.0.1:9/b?list-type=2&prefix=obman%2Ftrain%2F&"


def test_values_given_are_blanked_besides_the_environments(monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert redact("key profile-key-1234 and env x", ["profile-key-1234", None, "x"]) == (
        f"key {REDACTED} and env x"  # None and one-letter placeholders are not secrets to search for
    )


def test_text_without_secrets_is_unchanged():
    text = "permanent NoSuchKey: An error occurred (NoSuchKey) when calling GetObject: obman/train/x.jpg"
    assert redact(text) == text


def test_log_filter_redacts_message_arguments_and_traceback():
    try:
        raise ConnectionError(f"http://h/b?AWSAccessKeyId={KEY_ID}&Signature=abc")
    except ConnectionError as exc:
        record = logging.LogRecord(
            "botocore", logging.DEBUG, __file__, 1, "token %s", (TOKEN,), (type(exc), exc, None)
        )
    assert RedactingFilter().filter(record)
    assert_clean(logging.Formatter().format(record))
