"""The tiny test model: Qwen2 architecture with random weights and a small trained vocabulary."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ai_platform.export.progress import Progress
from ai_platform.export.tiny_tokenizer import train_tokenizer

SEED = 0
MAX_POSITIONS = 2048
# Far above the usual 0.02: small random weights make a tiny model echo its last input token forever,
# which would hide KV-cache and position bugs; at 0.5 greedy output depends on the whole context.
INIT_RANGE = 0.5


def prepare(work: Path, progress: Progress) -> Path:
    """Write the Hugging Face folder of the tiny model under ``work``."""
    hf_dir = work / "hf"
    with progress.step("trained a byte-level BPE tokenizer"):
        tokenizer = train_tokenizer(MAX_POSITIONS)
    with progress.step("built a random-weight Qwen2 model"):
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=MAX_POSITIONS,
            initializer_range=INIT_RANGE,
            tie_word_embeddings=True,  # as in Qwen2.5's small models
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(config)
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
    return hf_dir
