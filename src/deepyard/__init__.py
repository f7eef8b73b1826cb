"""deepyard: declarative deep-learning jobs on Ray, tracked in MLflow."""

__version__ = "0.1.0"
