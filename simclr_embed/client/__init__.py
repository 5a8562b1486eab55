"""The Python client of ``simclr serve`` (CONTRACT §5), torch-free.

    from simclr_embed.client import EmbeddingClient

    with EmbeddingClient("127.0.0.1:50051") as client:
        vectors = client.embed(["a.jpg", "b.png"], kind="features", normalize=True)  # [2, D]

``blocking`` is :class:`EmbeddingClient`, ``aio`` its asyncio twin; both share ``base``
(channels, retry rules), ``channel`` (service config, TLS) and ``codec`` (images ↔ proto).
"""

from simclr_embed.client.aio import AsyncEmbeddingClient
from simclr_embed.client.blocking import EmbeddingClient
from simclr_embed.client.codec import EmbedBatch, EmbeddingError, EmbedResult, Failure

__all__ = [
    "AsyncEmbeddingClient",
    "EmbedBatch",
    "EmbedResult",
    "EmbeddingClient",
    "EmbeddingError",
    "Failure",
]
