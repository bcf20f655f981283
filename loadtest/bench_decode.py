"""Microseconds of CPU per request on the request side of the OpenAI codec, alone: decoding a body into the
canonical request (validation included), the route stage's cheap prompt bound, and the passthrough splice
of one attempt; and, for comparison, what counting the prompt with the tokenizer adds (which happens only
when something needs it: see gateway.tokens.PromptTokens).

    python -m loadtest.bench_decode [--repeat 25]

Minimum over `--repeat` timed batches (the least disturbed by other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import timeit
from collections.abc import Callable

from gateway.api.openai.decode import decode
from gateway.passthrough import splice
from gateway.tokens import PromptTokens


def bodies() -> dict[str, bytes]:
    small = {
        "model": "bench",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello in five words, please."},
        ],
        "max_tokens": 64,
    }
    agent = {
        "model": "bench",
        "messages": [
            {"role": "user" if i % 2 else "assistant", "content": "lorem ipsum dolor sit amet " * 12} for i in range(20)
        ],
        "tools": [
            {
                "type": "function",
                "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}},
            }
        ],
        "max_tokens": 256,
        "x_vendor": {"k": [1, 2, 3]},
    }
    return {
        "small, compact": json.dumps(small, separators=(",", ":")).encode(),
        "small, SDK spacing": json.dumps(small).encode(),
        "20 messages + a tool": json.dumps(agent).encode(),
    }


def per_request(body: bytes, *, count: bool) -> Callable[[], object]:
    def run() -> object:
        request = decode(body, "chat")
        assert request.original is not None
        prompt = PromptTokens(request.prompt_texts, chat=True)
        prompt.count_now() if count else prompt.bound()
        return splice(request.original, "upstream-model")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=25)
    args = parser.parse_args()
    print(f"{'body':<24} {'bytes':>6} {'decode+bound+splice µs':>24} {'+ tokenizer µs':>16}")
    for name, body in bodies().items():
        number = max(50, 200_000 // len(body))
        row = []
        for count in (False, True):
            best = min(timeit.repeat(per_request(body, count=count), number=number, repeat=args.repeat))
            row.append(best / number * 1e6)
        print(f"{name:<24} {len(body):>6} {row[0]:>24.1f} {row[1]:>16.1f}")


if __name__ == "__main__":
    main()
