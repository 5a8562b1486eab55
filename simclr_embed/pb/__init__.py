"""Generated gRPC/protobuf stubs for ``proto/simclr/v1`` (regenerate with ``make proto``)."""
