"""Moved to :mod:`compressor.learning.tasks`; this name stays for one release (the README
documented it for plugin authors). Import from ``compressor.learning.tasks`` or the façade."""

from compressor.learning.tasks import *  # noqa: F403
