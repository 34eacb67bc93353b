"""first-hop-proxy: a fast, resilient OpenAI-compatible proxy for SillyTavern."""

__version__ = "0.1.0"
