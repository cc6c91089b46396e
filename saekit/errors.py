"""One exception type for every mistake a user can fix; the CLI prints it as a single line."""


class SaekitError(Exception):
    """A user-facing error: the message names the setting at fault and how to fix it."""


class ConfigError(SaekitError):
    """A setting is out of range or inconsistent with another one."""


class DataError(SaekitError):
    """Input data (text, cache, checkpoint) is missing, too small or corrupt."""


class TrainingDiverged(SaekitError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def require(condition: bool, message: str, kind: type[SaekitError] = ConfigError) -> None:
    """Raise `kind(message)` unless `condition` holds."""
    if not condition:
        raise kind(message)


def check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    """Fail with a one-line message naming the field when `value` is not one of `choices`."""
    require(value in choices, f"{field}={value!r} is not valid; use one of: {', '.join(choices)}")
