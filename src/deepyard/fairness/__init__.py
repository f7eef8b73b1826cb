"""Fairness of classifiers on tables: per-group metrics and disparities (``measure``), and a
mitigated version that applies per-group thresholds (``mitigate``), both with fairlearn."""
