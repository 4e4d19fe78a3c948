"""Training (layer 7): optimizers, the pure step, `TrainState`, the loop and its hooks, `Trainer`,
the LR range test."""
