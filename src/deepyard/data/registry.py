from deepyard.registry import Registry

DATASETS = Registry("data set")
