"""Architectures: the registry, ImageNet weights, the grading head."""
