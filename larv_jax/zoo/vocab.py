"""The zoo's word-level CLIP-style tokenizer (``tokenizers`` WordLevel, whitespace, lowercase).

Ids: ``0 = [UNK]``, then the sorted words, then ``<|startoftext|>`` (V - 2) and ``<|endoftext|>``
(V - 1), so the EOS id is the largest (``eos_token_id = vocab_size - 1``; the text tower pools at
the first EOS, and padding after EOS is EOS). A post-processor wraps every text in
``<|startoftext|> ... <|endoftext|>`` like CLIP's own ``tokenizer.json``.
"""

from __future__ import annotations

from collections.abc import Iterable

from larv_jax.models.tokenizer import BOS, EOS

UNK = "[UNK]"


def words_of(texts: Iterable[str]) -> list[str]:
    """Sorted distinct lowercase words of ``texts`` under the whitespace pre-tokenizer."""
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    out: set[str] = set()
    for t in texts:
        out.update(w for w, _ in pre.pre_tokenize_str(t.lower()))
    return sorted(out)


def build_tokenizer(texts: Iterable[str]):
    """A ``tokenizers.Tokenizer`` whose vocabulary is every word of ``texts`` (plus the specials)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = [w for w in words_of(texts) if w not in (UNK, BOS, EOS)]
    vocab = {UNK: 0, **{w: i + 1 for i, w in enumerate(words)}}
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    tok.add_special_tokens([BOS, EOS])
    return tok


def tokenizer_json(tok) -> str:
    """The ``tokenizer.json`` text (what ``larv_jax.models.tokenizer.load_tokenizer`` reads)."""
    return tok.to_str(pretty=True)
