"""The user's errors: what `fedtt` reports as one line (exit 2) instead of a traceback."""


class ConfigError(ValueError):
    """A config file, override or model/config combination is wrong; the message names the
    key."""
