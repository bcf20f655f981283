"""Strait: an OpenAI-compatible inference router from edge to cloud."""

__version__ = "0.1.0"
