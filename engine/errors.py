"""Errors that name what was wrong and what to do about it."""


class GaliError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(GaliError, ValueError):
    """An invalid config key or value; the message names the key and what is accepted."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key


class DataError(GaliError, RuntimeError):
    """Unusable input data; the message names the path and the remedy."""
