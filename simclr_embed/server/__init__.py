"""``simclr serve``: the gRPC embedding server (torch-free: ONNX Runtime, Pillow, grpc.aio).

``core`` is the transport-neutral request path (images in → vectors, per-image errors, timings;
typed errors); ``servicer`` and ``streaming`` adapt it to ``simclr.v1`` gRPC. Below the core:
``batcher`` (pure asyncio dynamic batching) and ``simclr_embed.inference`` (decode/resize and the
model runtimes). ``app`` wires them with health, reflection, auth, TLS, metrics and drain;
``group`` runs ``--processes N`` workers on one port.
"""
