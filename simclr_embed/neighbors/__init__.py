"""What the vectors are for: nearest neighbours, near-duplicate groups, contact sheets.

``simclr neighbors`` lives in ``simclr_embed.neighbors.cli``; ``simclr_embed.neighbors.search`` is the Python API
(``nearest``, ``duplicate_groups``) and ``simclr_embed.neighbors.collection`` reads what ``simclr embed``
wrote.
"""
