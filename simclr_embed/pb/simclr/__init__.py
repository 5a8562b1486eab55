# Generated package marker (server/pb/generate.py).
