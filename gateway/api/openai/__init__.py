"""The OpenAI wire protocol at the edge: decoding what clients send, encoding what they get back."""
