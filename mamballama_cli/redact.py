"""Credentials in URLs never reach a file or a log: userinfo and secret-looking query values become ``***``."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters whose values are credentials (Azure's api-version and the like stay readable).
SECRET_PARAM = re.compile(r"key|token|secret|pass|pwd|auth|sig|credential|session|code", re.IGNORECASE)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def redact_url(url: str | None) -> str | None:
    """``url`` with the password of its userinfo (or the whole userinfo when it is a single token) and the values
    of secret query parameters replaced by ``***``; anything that does not parse is returned unchanged."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        user, _, _ = netloc.rpartition("@")[0].partition(":")
        kept = f"{user}:{MASK}" if ":" in netloc.rpartition("@")[0] else MASK
        port = f":{parts.port}" if parts.port else ""
        host = f"[{host}]" if host and ":" in host else host or ""
        netloc = f"{kept}@{host}{port}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str | None) -> list[str]:
    """The secret strings inside ``url`` (userinfo password or token, secret query values), longest first."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        found = [parts.password if parts.password is not None else parts.username]
        found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if SECRET_PARAM.search(k)]
    except ValueError:
        return []
    return sorted({s for s in found if s}, key=len, reverse=True)


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted (command lines, error messages)."""
    return _URL.sub(lambda m: redact_url(m.group(0)) or "", text)
