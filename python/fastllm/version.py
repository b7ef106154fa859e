"""fastllm's version: the one place it is written (pyproject.toml reads it from here; `fastllm.__version__`)."""

__version__ = "0.1.0"
