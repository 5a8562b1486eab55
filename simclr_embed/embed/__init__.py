"""``simclr embed``: a whole collection of image files to vectors on disk.

``job`` is the bulk job (inputs → engine → store, resumable); ``store`` writes ``.npy`` or Parquet
as it goes; the engine is ``offline`` (the model in this process, through
``simclr_embed.inference``) or a ``simclr_embed.client.EmbeddingClient`` (through servers);
``ray_job`` runs the same steps as a Ray Data pipeline; ``cli`` is the command.
"""
