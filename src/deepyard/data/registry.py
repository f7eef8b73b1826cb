from deepyard.registry import Registry

# A streaming source assigns its own splits (``data/streaming.py``): the spec's fractions and seed reach it.
DATASETS = Registry("data set", injected=("split_seed", "val_fraction", "test_fraction"))
