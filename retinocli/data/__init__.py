"""Datasets on disk: layouts -> records, splits, stats, the demo data. No torch."""
