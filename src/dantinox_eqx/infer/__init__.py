"""Using a trained model (layer 8): sampling (`Generator`) and evaluation."""
