"""What methods that learn share: data files, tasks and objectives, the training step."""
