"""Built-in plugins; each module registers through the ``compressor.plugins`` entry points."""
