"""Errors a user can act on.

Domain code raises these; the CLI turns them into one ``Error: ...`` line at a
single place (:func:`compressor.cli.main`). Each carries a full sentence.
"""


class CompressorError(Exception):
    """Base class: a runtime error shown as ``Error: <message>`` with exit 1."""

    exit_code = 1


class UsageError(CompressorError):
    """The command line asked for something impossible (exit 2)."""

    exit_code = 2


class InputError(CompressorError):
    """An input file or directory is missing, unreadable or malformed."""


class MismatchError(CompressorError):
    """Inputs that must line up (base and expert) do not."""


class RefError(CompressorError):
    """A reference matches no artifact, or more than one."""


class PluginError(CompressorError):
    """A plugin is missing, broken, or clashes with another."""


class UnknownPluginError(PluginError, UsageError):
    """``--plugin NAME`` names no registered method."""


class OptionError(UsageError):
    """An ``-o KEY VALUE`` option is unknown or has a bad value."""


class StoreError(CompressorError):
    """The artifact store refused an operation or found damage."""
