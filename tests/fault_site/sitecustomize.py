"""Fault injection (``tests/faults.py``) in every Python process of a driver started with this
folder on its PYTHONPATH, its own local Ray cluster's workers included."""

import faults

faults.install()
