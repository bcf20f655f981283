"""The OpenAI wire protocol at the edge: decoding what clients send (decode.py, to_canonical.py,
request_stage.py) and encoding what they get back (sse_encode.py)."""
