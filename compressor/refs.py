"""Moved to :mod:`compressor.app.refs`; this name stays for one release (the README
documented it for plugin authors). Import from ``compressor.app.refs`` or the façade."""

from compressor.app.refs import *  # noqa: F403
