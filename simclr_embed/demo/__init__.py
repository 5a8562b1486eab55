"""``make demo``: every stage on the bundled sample data (``sample_data``), end to end.

``pipeline`` runs train → export → serve → embed → report (``python -m simclr_embed.demo``);
``steps`` holds its pieces. An application of every stage, so nothing else imports it.
"""
