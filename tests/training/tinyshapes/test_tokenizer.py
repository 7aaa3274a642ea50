"""The caption tokenizer loads as a CLIPTokenizer and keeps every corpus word whole."""

import pytest
from transformers import CLIPTokenizer

from easel.training.tinyshapes.data import corpus_words
from easel.training.tinyshapes.tokenizer import MAX_LENGTH, caption_corpus, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(folder, caption_corpus(count=3000))
    return folder


def test_saved_in_the_clip_format(tokenizer_dir):
    assert (tokenizer_dir / "vocab.json").exists()
    assert (tokenizer_dir / "merges.txt").read_text().startswith("#version")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.model_max_length == MAX_LENGTH
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.eos_token == "<|endoftext|>"
    assert len(tokenizer) < 600  # small: the byte alphabet plus the caption words


def test_every_corpus_word_is_one_token(tokenizer_dir):
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    for word in corpus_words():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer.convert_ids_to_tokens(ids)[0] == word + "</w>"


def test_captions_fit_and_other_text_still_encodes(tokenizer_dir):
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    encoded = tokenizer("A big red circle on the left, on a white background")
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.input_ids[-1] == tokenizer.eos_token_id
    assert len(encoded.input_ids) == 14  # 11 words and a comma, one token each, plus BOS/EOS
    assert max(len(tokenizer(c).input_ids) for c in caption_corpus(count=2000)[:-1]) <= MAX_LENGTH
    unknown = tokenizer("a zebra").input_ids
    assert len(unknown) > 4  # split into pieces, not dropped
