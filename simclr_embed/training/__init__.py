"""SimCLR training: model, NT-Xent loss, augmentations, LARS, DDP via torchrun."""
