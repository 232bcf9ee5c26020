"""Redaction of secrets from any text that leaves the process."""

from __future__ import annotations

import re
from collections.abc import Mapping

MASK = "[REDACTED]"
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_MIN_SECRET = 8


def secret_name(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (a key, token, password).

    The one definition: redaction masks such values, and neither builders' commands nor the
    spec's checks get such variables (checks only where `checks.env` names them).
    """
    return _SECRET_NAME.search(name) is not None


def environment_secrets(environ: Mapping[str, str]) -> list[str]:
    """Values of environment variables whose names say they are secrets."""
    return [v for k, v in environ.items() if secret_name(k) and len(v) >= _MIN_SECRET]


class Redactor:
    def __init__(self, secrets: list[str] | None = None):
        self.secrets = sorted({s for s in secrets or [] if len(s) >= 6}, key=len, reverse=True)

    def found_in(self, data: bytes) -> bool:
        """Whether any secret occurs in `data` (a patch, a file)."""
        return any(s.encode() in data for s in self.secrets)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text
