"""The HTTP edge: OpenAI wire Structs, SSE framing and the Litestar handlers."""
