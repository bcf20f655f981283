"""Capture (placeholder)."""
