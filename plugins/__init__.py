"""Adapters shipped with Strait; each is registered under the `strait.adapters` entry-point group."""
