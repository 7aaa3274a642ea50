"""A BPE tokenizer trained on the caption corpus, saved in the CLIP tokenizer format.

The result is a folder with vocab.json + merges.txt (words end in "</w>", specials
<|startoftext|> and <|endoftext|>) that `transformers.CLIPTokenizer.from_pretrained` loads, as
`StableDiffusionPipeline` does. Every corpus word becomes a single token; any other text still
encodes, as bytes and shorter pieces.
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from easel.training.tinyshapes.data import caption, corpus_words, sample_scene

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 32  # the longest caption is ~22 tokens with BOS/EOS


def caption_corpus(count: int = 20_000, seed: int = 0) -> list[str]:
    """Random training captions plus one line with every corpus word (so none is missed)."""
    rng = random.Random(seed)
    return [caption(sample_scene(rng), rng) for _ in range(count)] + [" ".join(corpus_words())]


def train_tokenizer(out_dir: str | Path, corpus: list[str] | None = None) -> CLIPTokenizer:
    """Train the BPE on `corpus` (default: `caption_corpus()`), save it to `out_dir`, return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = caption_corpus() if corpus is None else corpus
    bpe = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    # The same text pipeline as CLIPTokenizer, so training sees the words it will see.
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # min_frequency=2 with a large vocab_size: merging goes on until every word that occurs at
    # least twice is whole, and no more.
    trainer = trainers.BpeTrainer(
        vocab_size=5000,
        min_frequency=2,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(corpus + corpus[-1:], trainer=trainer)
    # vocab.json + merges.txt is the format every transformers version reads (5.x adds
    # tokenizer.json on save_pretrained).
    bpe.model.save(str(out_dir))
    tokenizer = CLIPTokenizer.from_pretrained(out_dir, model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
