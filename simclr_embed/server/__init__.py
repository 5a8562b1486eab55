"""gRPC embedding server for exported SimCLR models (torch-free: ONNX Runtime, Pillow, grpc.aio).

Layers, each importing only what it needs: ``servicer`` (proto <-> numpy, status codes) →
``images`` (decode/validate/resize) and ``batcher`` (pure asyncio dynamic batching) → ``runtime``
(ONNX Runtime). ``app`` wires them with health, reflection, auth, TLS and metrics;
``client`` is the Python API and ``embed_cli`` the ``simclr embed`` command.
"""
