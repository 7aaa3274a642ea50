"""Fixtures shared by the evaluator tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel

from easel.training.tinyshapes.tokenizer import caption_corpus, train_tokenizer
from tests.tiny_models import make_tiny_sd


@pytest.fixture(scope="session")
def random_shapes_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD with random weights but tiny-shapes' own caption tokenizer."""
    root = tmp_path_factory.mktemp("random-shapes")
    pipe = StableDiffusionPipeline.from_pretrained(make_tiny_sd(root / "base"))
    tokenizer = train_tokenizer(root / "tokenizer", caption_corpus(count=300))
    config = pipe.text_encoder.config
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    pipe.register_modules(tokenizer=tokenizer, text_encoder=CLIPTextModel(config))
    pipe.save_pretrained(root / "model")
    # a trained folder's own defaults (training writes them), so eval need not be told
    defaults = {
        "num_inference_steps": 2,
        "guidance_scale": 3.0,
        "guidance_end": 0.5,
        # tiny-shapes' size, as its easel.json has it (edits work at the model's default size)
        "width": 64,
        "height": 64,
        "min_size": 32,
        "max_size": 128,
    }
    (root / "model" / "easel.json").write_text(json.dumps({"defaults": defaults}))
    return root / "model"
