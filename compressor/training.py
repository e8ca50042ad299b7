"""Moved to :mod:`compressor.learning.training`; this name stays for one release (the README
documented it for plugin authors). Import from ``compressor.learning.training`` or the façade."""

from compressor.learning.training import *  # noqa: F403
