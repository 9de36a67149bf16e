"""User-facing errors: the CLI prints these as one paragraph, never as a traceback."""


class MoefitError(Exception):
    """A problem the user can fix (bad config, missing file, broken data line, run that will not fit)."""


class ConfigError(MoefitError):
    """A run config that does not validate; the message names the key."""


class DataError(MoefitError):
    """A data file that cannot be used; the message names the file and the line."""
