"""Training: the one loop (loop.py: Trainer, Objective), the train state, the optimizer, metrics, losses
(losses.py: the LM loss, chunked or not, and sequence log-probs), RL math (rl_math.py), and one module per objective
(pretrain.py, sft.py, ...), each only its batches, its loss and its metrics."""
