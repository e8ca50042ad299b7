"""What a command does: runs, exports, evaluation, references, plans, executors and
mergekit configs."""
