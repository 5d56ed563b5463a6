"""Engine: the training loop, precision, optimisers/schedulers, checkpoints, early stopping."""
