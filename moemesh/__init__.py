"""moemesh: serving Mixture-of-Experts language models with large expert parallelism."""

__version__ = "0.1.0"
