"""Moved to :mod:`compressor.io.sources`; this name stays for one release (the README
documented it for plugin authors). Import from ``compressor.io.sources`` or the façade."""

from compressor.io.sources import *  # noqa: F403
