# Generated package marker (simclr_embed/pb/generate.py).
