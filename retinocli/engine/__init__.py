"""Training: Dataset and loader, augmentation, the trainer, placement, checkpoints."""
