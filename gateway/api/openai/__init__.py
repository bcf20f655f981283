"""The OpenAI codec: Chat Completions, legacy Completions and Embeddings bodies to canonical requests
(request side: decode.py, to_canonical.py, request_stage.py)."""
