"""The one exception type that reaches the user as a one-line message."""


class ObserverError(Exception):
    """A problem the user can act on. The CLI prints ``hvo-observer: <message>`` and exits non-zero.

    The message must name the culprit: a file, a flag, a value.
    """

    exit_code = 2


class KernelFactError(ObserverError):
    """A kernel interface file is missing, unreadable or malformed."""
