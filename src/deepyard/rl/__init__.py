"""Reinforcement learning on RLlib's current API stack: algorithm configs from a spec
(``algorithms``), and the trained policy as a plain module that plays an environment (``policy``)."""
