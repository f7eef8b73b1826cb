"""Adversarial robustness: attacks (``attacks``) that the robustness job measures a registered
classifier with, and that adversarial training trains against."""
