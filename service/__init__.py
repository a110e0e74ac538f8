"""sgd-service: SGD fits with PyTorch autograd, served over REST."""

__version__ = "0.1.0"
