"""memrecall: compressed-memory long-context reasoning in JAX/Flax."""

__version__ = "0.1.0"
