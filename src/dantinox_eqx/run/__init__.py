"""The run directory (layer 6): its layout and files, checkpoints, loading a trained run,
fine-tuning bases, export, model_summary.json. Nothing here trains."""
