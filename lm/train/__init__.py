"""Training: the one loop (loop.py), the train state, the optimizer, metrics, and objectives (pretrain.py)."""
