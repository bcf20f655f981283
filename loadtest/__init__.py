"""Load and overhead measurements for Strait: a cheap fake upstream, an aiohttp load generator, and the
direct-vs-gateway overhead runner (see loadtest/README.md)."""
