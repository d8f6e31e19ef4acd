"""CLIP text tokenizer from the ``tokenizer.json`` inside a checkpoint directory (no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class CLIPTokenizer:
    """Wraps a ``tokenizers.Tokenizer``: texts -> ``[N, context_length]`` int32 ids with
    ``<|startoftext|> ... <|endoftext|>`` and padding after EOS (truncated texts keep their EOS)."""

    def __init__(self, tok, context_length: int, *, pad_id: int | None = None,
                 source: str = "tokenizer.json"):
        self.tok = tok
        self.context_length = int(context_length)
        self.bos_id = tok.token_to_id(BOS)
        self.eos_id = tok.token_to_id(EOS)
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"{source}: tokenizer lacks the CLIP special tokens {BOS} / {EOS}")
        probe = tok.encode("a").ids
        self._adds_special = bool(probe) and probe[0] == self.bos_id and probe[-1] == self.eos_id
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int32)
        for row, enc in enumerate(self.tok.encode_batch(list(texts))):
            ids = list(enc.ids)
            if not self._adds_special:
                ids = [self.bos_id, *ids, self.eos_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length - 1] + [self.eos_id]
            out[row, : len(ids)] = ids
        return out

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()


def load_tokenizer(path: str | Path, context_length: int = 77) -> CLIPTokenizer:
    """``path``: a checkpoint directory holding ``tokenizer.json``, or the file itself."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no tokenizer.json (save one with the checkpoint; "
                                "CLIPTokenizerFast.save_pretrained writes it)")
    tok = Tokenizer.from_file(str(file))
    pad_id = tok.padding["pad_id"] if tok.padding else None
    tok.no_truncation()
    tok.no_padding()
    return CLIPTokenizer(tok, context_length, pad_id=pad_id, source=str(file))
