"""The ``compress`` command: a click group; commands live in one module per noun.

Errors are turned into one ``Error: ...`` line here and nowhere else.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path

import click

from compressor.errors import CompressorError


class CLIError(click.ClickException):
    """One ``Error: ...`` line with the exit code of the domain error (1 or 2)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class State:
    """Global options, and the store opened on first use."""

    def __init__(self, store_dir: Path | None, quiet: bool, blobs: str | None = None):
        self.store_dir = store_dir
        self.blobs = blobs
        self.quiet = quiet
        self._store = None

    @property
    def store(self):
        if self._store is None:
            from compressor.store import open_store

            self._store = open_store(self.store_dir, blobs=self.blobs)
        return self._store

    def close(self):
        if self._store is not None:
            self._store.close()


def os_error_message(e: OSError) -> str:
    """A sentence for an operating-system failure: what happened, and to which file."""
    import errno

    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device{where}; free some space and run the command again"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: this user cannot write or read there"
    return f"{e.strerror or e}{where}"


class Group(click.Group):
    """A click group that reports CompressorError, a usage error (click's, without its
    usage block) and any crash as one line."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise CLIError(e.format_message(), 2) from None

    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():  # library warnings become one line each
                warnings.simplefilter("always", _warning_category())
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except click.UsageError as e:  # a subcommand's own arguments: one line, exit 2
            raise CLIError(e.format_message(), 2) from None
        except (click.exceptions.Exit, click.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            raise click.Abort() from None
        except Exception as e:  # one line whatever it is; the traceback on demand
            if os.environ.get("COMPRESSOR_DEBUG") == "1":
                traceback.print_exc()
            raise CLIError(*_one_line(e)) from None


def _warning_category():
    from compressor.reporting import CompressorWarning

    return CompressorWarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, _warning_category()):
        click.echo(f"Warning: {message}", err=True)
    else:  # another library's warning: its usual form
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _one_line(e: Exception) -> tuple[str, int]:
    """The message and exit code of an error escaping a command."""
    if isinstance(e, CompressorError):
        return str(e), e.exit_code
    if isinstance(e, OSError):  # disk full, permissions: the OS's words, with the path
        return os_error_message(e), 1
    return f"{type(e).__name__}: {e} (set COMPRESSOR_DEBUG=1 for a traceback)", 1


@click.group(cls=Group)
@click.version_option(package_name="compressor")
@click.option(
    "--store",
    "store_dir",
    envvar="COMPRESSOR_STORE",
    help="Store directory (default: $COMPRESSOR_STORE, else the user data directory).",
)
@click.option(
    "--blobs",
    envvar="COMPRESSOR_BLOBS",
    metavar="URL",
    help="Where a new store keeps its blobs: an fsspec URL (s3://bucket/prefix, gs://..., "
    "a shared directory); recorded in the store, its local blobs/ by default.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option(
    "--device",
    envvar="COMPRESSOR_DEVICE",
    metavar="auto|cpu|cuda|cuda:N|mps",
    help="Where tensor math runs (default: auto, CUDA when present, else the CPU): every "
    "method's math and every model the tool runs; reading and writing stream on the CPU.",
)
@click.pass_context
def cli(ctx, store_dir, blobs, quiet, device):
    """Compress, merge and reshape neural-network weights.

    Every result is a versioned artifact in a store, with its parents,
    parameters and metrics.
    """
    if store_dir is not None and not store_dir.strip():
        raise click.BadParameter("the store directory must not be empty", param_hint="--store")
    from compressor.io import devices

    devices.request(device)
    state = State(Path(store_dir) if store_dir is not None else None, quiet, blobs or None)
    ctx.obj = state
    ctx.call_on_close(state.close)


def _add_commands() -> None:
    from compressor.cli import demo, evaluation, export, plan, plugins, run, store

    for module in (run, export, evaluation, plan, plugins, store, demo):
        module.register(cli)


_add_commands()


INTERRUPT_GRACE = 1.0  # seconds a command has to stop on Ctrl-C before it is ended


def stop_on_interrupt(grace: float = INTERRUPT_GRACE) -> None:
    """Make Ctrl-C end the process within ``grace`` seconds, whatever it is doing.

    Python raises KeyboardInterrupt only between bytecodes, so a long native call (one
    backward pass of a model on a loaded machine) delays it for minutes. SIGINT also
    writes to a wakeup fd at once; a thread reading it gives the main thread ``grace``
    seconds to unwind, then ends the process with 130 (the store is safe: nothing is
    visible before its commit, and gc clears temp files of dead processes)."""
    import signal
    import threading
    import time

    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: leave Ctrl-C as it is
        return

    def watch():
        while signal.SIGINT not in os.read(r, 64):
            pass
        time.sleep(grace)
        sys.stderr.write("\nAborted (interrupted).\n")
        sys.stderr.flush()
        os._exit(130)

    threading.Thread(target=watch, daemon=True, name="stop-on-interrupt").start()


def main() -> None:
    """Console-script entry point: load plugin commands, then run."""
    from compressor.allocator import reuse_freed_blocks

    stop_on_interrupt()
    reuse_freed_blocks()
    try:
        from compressor.registry import register_plugin_commands

        register_plugin_commands(cli)
    except CompressorError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(e.exit_code)
    cli()
