"""Model knowledge: architectures (layer names, widths, configs), building a
transformers model from a source, and running it block by block."""
