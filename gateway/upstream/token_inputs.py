"""Embedding inputs and completion prompts given as token arrays, for an upstream that reads another
vocabulary.

OpenAI's embeddings and (legacy) completions APIs take token ids as well as text, and clients use it:
LangChain's `OpenAIEmbeddings` sends each text as cl100k_base token ids by default. Those ids mean
something only to a model whose tokenizer is cl100k_base (OpenAI's text-embedding-3-*, ada-002,
gpt-3.5-turbo-instruct); forwarded to any other model (a llama.cpp or vLLM model) they are read in its
own vocabulary and mean unrelated text ("red apples" became " mat scratches" on llama.cpp), silently.
So before a request goes to a deployment whose model's `tokenizer` (policy) is not cl100k_base, its
token arrays are decoded to text with cl100k_base (offline, gateway.tokens) and sent as text; an id
cl100k_base does not have is a 400 naming the input. A token array cut inside a character (LangChain
cuts long texts every 8191 tokens) keeps U+FFFD for the cut bytes.
"""

from __future__ import annotations

import asyncio

import msgspec

from gateway.canonical import Request
from gateway.errors import InvalidRequest
from gateway.tokens import encoding

# The vocabulary OpenAI's API reads token arrays in (its embedding models' tokenizer).
CLIENT_VOCABULARY = "cl100k_base"


def needs_text(request: Request, tokenizer: str) -> bool:
    """Whether `request` holds token arrays that a model counting with `tokenizer` would misread."""
    return (
        request.operation != "chat" and tokenizer != CLIENT_VOCABULARY and any(type(i) is tuple for i in request.inputs)
    )


def detokenize(tokens: tuple[int, ...] | list[int]) -> str:
    """cl100k_base token ids as text (bytes that are not whole UTF-8 characters become U+FFFD);
    ValueError naming the first id cl100k_base does not have."""
    enc = encoding(CLIENT_VOCABULARY)
    try:
        raw = enc.decode_bytes(tokens)
    except (KeyError, OverflowError, ValueError):
        for token in tokens:
            if not 0 <= token <= enc.max_token_value:
                raise ValueError(token) from None
            try:
                enc.decode_single_token_bytes(token)
            except KeyError:
                raise ValueError(token) from None
        raise
    return raw.decode("utf-8", "replace")


def _texts(inputs: tuple[str | tuple[int, ...], ...], where: str) -> tuple[str, ...]:
    out: list[str] = []
    for k, item in enumerate(inputs):
        if isinstance(item, str):
            out.append(item)
            continue
        try:
            out.append(detokenize(item))
        except ValueError as exc:
            raise InvalidRequest(
                f"'{where}[{k}]' holds the token id {exc.args[0]}, which is not a {CLIENT_VOCABULARY} token: token "
                f"arrays are read as {CLIENT_VOCABULARY} (OpenAI's) and decoded to text for this model; "
                "send text instead.",
                param=f"{where}[{k}]",
            ) from None
    return tuple(out)


async def as_text(request: Request) -> tuple[Request, bytes]:
    """The request with its token arrays decoded to text, and the JSON of its new `input` or `prompt`
    (for the client's bytes, gateway.passthrough.splice). Off the event loop: an embeddings batch may hold
    millions of ids, and the encoding is built on first use."""
    where = "input" if request.operation == "embeddings" else "prompt"
    texts = await asyncio.to_thread(_texts, request.inputs, where)
    # One input goes as one string: a completions engine may answer a list (even of one) in another shape.
    value = msgspec.json.encode(texts[0] if len(texts) == 1 else texts)
    return msgspec.structs.replace(request, inputs=texts), value
