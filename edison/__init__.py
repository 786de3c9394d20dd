"""Edison: a self-hosted LLM chat service where Stop means stop."""

__version__ = "0.1.0"
