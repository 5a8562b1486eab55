"""Evaluation of frozen embeddings: weighted kNN and linear probe on labeled folders.

``simclr evaluate`` lives in ``simclr_embed.evaluation.cli``; ``simclr_embed.training.knn`` is also used by the
training-time ``--eval-data`` monitor.
"""
