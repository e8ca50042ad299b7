"""Moved to :mod:`compressor.models.modeling`; this name stays for one release (the README
documented it for plugin authors). Import from ``compressor.models.modeling`` or the façade."""

from compressor.models.modeling import *  # noqa: F403
