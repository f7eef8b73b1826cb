"""The model zoo: one file per family. Modules take flat typed kwargs and never see a spec.

Every builder receives ``in_shape`` (one sample's shape) and ``num_outputs`` from the data set,
and ``vocab_size`` if it declares it (models over token ids); its other keyword arguments are the
``model.params`` a spec may set.
"""

from deepyard.models.registry import MODELS
from deepyard.models import cnn, gan, mlp, perceptron, rnn, seq2seq, transformer  # noqa: F401  (registers the builders)

__all__ = ["MODELS"]
