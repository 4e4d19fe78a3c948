"""Layers that take plain sizes, never a `Config` (layer 3): linear, norm, rope, attention (and
its backward rule and KV cache), MLA, MLP, MoE. `model.py` builds them from a Config."""
