"""Errors a user can cause. The CLI prints their message as one line, without a traceback.

Each kind of mistake has its own type so callers (and tests) can tell them apart; every
message names the file, line or config key at fault and says what to do about it.
"""


class TptError(Exception):
    """Base class for user-facing errors: bad config, bad input file, bad checkpoint."""

    exit_code = 2


class ConfigError(TptError):
    """A config file, an override or a combination of values is invalid."""


class CheckpointError(TptError):
    """A checkpoint or HF folder is missing, malformed or does not match the config."""


class MissingExtraError(TptError):
    """A command needs an optional part of the install (a pip extra) that is not installed.

    Training workers install the slim base (no TensorFlow); `tpt prepare` and `tpt serve` need
    their extras, named in pyproject.toml's [project.optional-dependencies].
    """

    def __init__(self, user: str, extra: str, module: str | None = None):
        missing = f" (no module named '{module.split('.')[0]}')" if module else ""
        super().__init__(
            f"{user} needs the '{extra}' extra: pip install 'tpt_jax[{extra}]'{missing}"
        )
        self.extra = extra
