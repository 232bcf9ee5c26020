"""One error type per boundary; the CLI turns each into a short message and exit code 2."""

from __future__ import annotations


class FlowError(Exception):
    """Base of every error flow reports to the user without a traceback."""

    exit_code = 2


class ConfigError(FlowError):
    """agents.yaml (or a layer of it) is invalid."""


class SpecError(FlowError):
    """A spec file is invalid."""


class WorkspaceError(FlowError):
    """The git repository is not in a state flow can work with."""


class BudgetExceeded(FlowError):
    """A call was not made because its worst-case cost does not fit what is left."""


class ProviderError(FlowError):
    """A model provider failed in a way a retry cannot fix."""

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class AuthenticationFailed(ProviderError):
    """The provider refused the key: every later call to it would fail too."""


class KeyRefused(FlowError):
    """A run stopped because a provider refused its key; the rest of its work is kept and
    `flow resume` finishes it once the key is fixed."""

    exit_code = 3


class Interrupted(FlowError):
    """Ctrl-C or SIGTERM: the run stopped cleanly and can be resumed."""

    exit_code = 130
