"""Evaluation: in-context learning, tasks with checkable answers, graders, the stage reports."""
