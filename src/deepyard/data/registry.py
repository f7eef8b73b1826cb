from deepyard.registry import Registry

# A streaming source assigns its own splits (``data/streaming.py``): the spec's fractions and seed
# reach it, and whether the spec asks to stream (``data.stream``).
DATASETS = Registry("data set", injected=("split_seed", "val_fraction", "test_fraction", "stream"))
