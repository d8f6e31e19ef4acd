"""Tokenizer loading from a checkpoint directory: BOS/EOS, padding and truncation by hand."""

import numpy as np
import pytest

from larv_jax.models.tokenizer import load_tokenizer


def _word_level(path, with_template: bool):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "[UNK]": 2, "a": 3, "photo": 4, "of": 5,
             "cat": 6, "dog": 7, ".": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    if with_template:
        tok.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    tok.save(str(path / "tokenizer.json"))


@pytest.mark.parametrize("with_template", [True, False])
def test_ids_by_hand(tmp_path, with_template):
    _word_level(tmp_path, with_template)
    tok = load_tokenizer(tmp_path, context_length=6)
    ids = tok(["A photo of a CAT.", "dog", "zebra"])
    assert ids.dtype == np.int32 and ids.shape == (3, 6)
    # truncated: keeps EOS as the last token
    np.testing.assert_array_equal(ids[0], [0, 3, 4, 5, 3, 1])
    # padded with EOS after EOS (pooling takes the first EOS)
    np.testing.assert_array_equal(ids[1], [0, 7, 1, 1, 1, 1])
    np.testing.assert_array_equal(ids[2], [0, 2, 1, 1, 1, 1])


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
