"""The Anthropic Messages codec: `POST /v1/messages` and `/v1/messages/count_tokens` (issue 11)."""
