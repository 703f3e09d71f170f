"""Measuring and showing: metrics (numpy), evaluate, figures, report.md, rendering, compare, bench."""
