"""Errors the user can fix. `toa` prints their message (which names the file, line or field and
the fix) and exits with status 2, without a traceback (`--debug` shows it); everything already
done stays recorded. Raise a subclass wherever such a problem is found."""


class UserError(ValueError):
    """A problem in what the user gave toa (config, prompt file, endpoint), not a bug."""


class UnknownRun(UserError, LookupError):
    """A run id with nothing recorded under the results root (`toa report`, `toa export`)."""
