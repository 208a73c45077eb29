"""Training data: seeded synthetic tokens or a text file read as bytes (one token per byte).

Every rank builds the same global batch of the step from (seed, step) alone and keeps its own
slice, so any layout trains on exactly the sequences the serial model would: data-parallel
replica k takes sequences [k B/d, (k+1) B/d), and its micro-batch i the b sequences
[i b, (i+1) b) of those. No rank ever waits on another for data.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from modelpar.specs.errors import SpecError

BYTE_VOCAB = 256
SYNTHETIC = "synthetic"
"""`--data synthetic`: uniform random tokens (no packaged text needed, any vocabulary)."""


def default_corpus_text() -> str:
    """The small English text shipped with the package (`modelpar/corpus/default.txt`)."""
    return resources.files("modelpar").joinpath("corpus/default.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Batch:
    """One micro-batch: inputs and next-token targets, both [b, s] int64."""

    tokens: torch.Tensor
    targets: torch.Tensor


class TokenSource:
    """Produces the global batch of a step, [B, s + 1] int64 tokens, from (seed, step) only."""

    description = "tokens"

    def global_batch(self, step: int, global_batch_size: int, seq_length: int) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _generator(seed: int, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed * 1_000_003 + step)


class SyntheticTokens(TokenSource):
    """Uniform random tokens in [0, vocab_size) (the loss stays near ln V: a throughput workload)."""

    def __init__(self, vocab_size: int, seed: int) -> None:
        self.vocab_size, self.seed = vocab_size, seed
        self.description = f"synthetic tokens (vocab {vocab_size}, seed {seed})"

    def global_batch(self, step: int, global_batch_size: int, seq_length: int) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, (global_batch_size, seq_length + 1),
                             generator=self._generator(self.seed, step))


class ByteText(TokenSource):
    """A text as UTF-8 bytes; each sequence is a window at a seeded random offset."""

    def __init__(self, data: bytes, seed: int, name: str = "text") -> None:
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
        self.seed = seed
        self.description = f"{name} ({len(data)} bytes, byte-level tokens)"

    def global_batch(self, step: int, global_batch_size: int, seq_length: int) -> torch.Tensor:
        window = seq_length + 1
        if self.data.numel() < window:
            raise SpecError(
                f"data: the text has {self.data.numel()} bytes, fewer than seq_length + 1 = {window}; "
                "give a longer file"
            )
        starts = torch.randint(0, self.data.numel() - window + 1, (global_batch_size,),
                               generator=self._generator(self.seed, step))
        return torch.stack([self.data[s: s + window] for s in starts.tolist()])


def make_token_source(data_path: str | None, vocab_size: int, seed: int) -> TokenSource:
    """`data_path`: a text file, 'synthetic', or None (the packaged corpus when the vocabulary
    holds the 256 byte values, else synthetic tokens). Raises SpecError for a missing file or a
    text file with a vocabulary below 256."""
    if data_path == SYNTHETIC:
        return SyntheticTokens(vocab_size, seed)
    if data_path is None:
        if vocab_size < BYTE_VOCAB:
            return SyntheticTokens(vocab_size, seed)
        return ByteText(default_corpus_text().encode("utf-8"), seed, name="packaged corpus")
    path = Path(data_path)
    if not path.is_file():
        raise SpecError(f"--data {data_path}: no such file; give a text file or 'synthetic'")
    if vocab_size < BYTE_VOCAB:
        raise SpecError(
            f"--data {data_path}: byte-level text needs vocab_size >= {BYTE_VOCAB}, the model has {vocab_size}; "
            "use a model with a larger vocabulary or --data synthetic"
        )
    return ByteText(path.read_bytes(), seed, name=str(path))


def micro_batches(global_batch: torch.Tensor, data_rank: int, data_parallel: int,
                  micro_batch_size: int) -> list[Batch]:
    """This replica's micro-batches of the step's global batch [B, s + 1], in order."""
    per_replica = global_batch.shape[0] // data_parallel
    mine = global_batch[data_rank * per_replica: (data_rank + 1) * per_replica]
    return [
        Batch(mine[i: i + micro_batch_size, :-1].contiguous(), mine[i: i + micro_batch_size, 1:].contiguous())
        for i in range(0, per_replica, micro_batch_size)
    ]
