"""The streaming merge loop, its sparsifiers, the per-expert parameter grammar,
merge rules, mergekit-exact arithmetic and vocabulary alignment."""
