"""`anthropic`: Anthropic's native Messages API (`POST {base_url}/v1/messages`).

- `adapter.py`: the Adapter (HTTP, headers, limits, error and stream plumbing);
- `request.py`: the canonical request as a Messages body (an OpenAI client's request, or a rescue);
- `answer.py`: a Messages answer (JSON) as a chat completion, usage and stop reasons mapped;
- `stream.py`: Messages stream events decoded, incrementally, into chat completion chunks.

A client that speaks Messages itself has its own bytes sent with only `model` replaced, and its answer
is relayed as the upstream sent it (contracts.NativeAnswer) while the pipeline reads the translation.
docs/anthropic.md describes the mapping and the extension fields (`thinking_blocks`).
"""
