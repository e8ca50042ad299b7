"""The streaming merge loop, its sparsifiers, the per-expert parameter grammar,
mergekit-exact arithmetic, restacked slices and vocabulary alignment (each method's own math
lives beside its declaration in its plugin)."""
