"""Evaluation of frozen embeddings: weighted kNN and linear probe on labeled folders.

``simclr evaluate`` lives in ``evaluation.cli``; ``evaluation.knn`` is also used by the
training-time ``--eval-data`` monitor.
"""
