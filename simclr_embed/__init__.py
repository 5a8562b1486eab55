"""simclr-embed: shared pieces of the three stages (CLI dispatcher, image I/O, atomic files).

This package imports neither torch nor grpc, so every stage (and the torch-free server image)
can use it.
"""

__version__ = "0.1.0"
