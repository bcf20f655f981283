"""The response cache (issue 9): scope, matching and embedders, storage (store.py), stream replay (replay.py)."""
