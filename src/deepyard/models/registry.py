from deepyard.registry import Registry

MODELS = Registry("model", injected=("in_shape", "num_outputs", "vocab_size"))
