"""What the vectors are for: nearest neighbours, near-duplicate groups, contact sheets.

``simclr neighbors`` lives in ``neighbors.cli``; ``neighbors.search`` is the Python API
(``nearest``, ``duplicate_groups``) and ``neighbors.collection`` reads what ``simclr embed``
wrote.
"""
