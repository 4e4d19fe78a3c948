"""Tools built on training and inference (layer 9): sweeps, plots."""
