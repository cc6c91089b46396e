"""saekit: train, evaluate and compare sparse autoencoders on language-model activations."""

__version__ = "0.1.0"
