"""Moved to :mod:`compressor.models.blockwise`; this name stays for one release (the README
documented it for plugin authors). Import from ``compressor.models.blockwise`` or the façade."""

from compressor.models.blockwise import *  # noqa: F403
