"""User-facing errors: the CLI prints these as one paragraph, never as a traceback."""


class MoefitError(Exception):
    """A problem the user can fix (bad config, missing file, broken data line, run that will not fit)."""


class ConfigError(MoefitError):
    """A run config that does not validate; the message names the key."""


class DataError(MoefitError):
    """A data file that cannot be used; the message names the file and the line."""


class WorkersFailed(MoefitError):
    """A multi-process run (`--gpus N`) that stopped: the workers (or the launcher) have printed why;
    `exit_code` is the job's (1 a failed smoke run, 2 a moefit error, 3 a worker that died)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class DamagedFileError(MoefitError):
    """A file that exists but cannot be read as what it should be (truncated, garbage, inconsistent)."""

    def __init__(self, path: object, why: str, advice: str):
        super().__init__(f"{path}: {why}. {advice}")
        self.path, self.why = path, why
