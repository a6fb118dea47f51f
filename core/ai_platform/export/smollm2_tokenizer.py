"""Repairs the tokenizer transformers derives from SmolLM2's GGUF file.

The conversion treats it like a SentencePiece Llama tokenizer: eos becomes ``<|im_start|>``,
a BOS is prepended (chat prompts then open with ``<|im_start|>`` twice), the ``Digits``
pre-tokenizer is lost and the decoder keeps SentencePiece steps. The repair restores the
GPT-2-style byte-level setup of the original SmolLM2 tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

ENDOFTEXT, IM_END = "<|endoftext|>", "<|im_end|>"


def repair(converted: PreTrainedTokenizerFast, max_length: int) -> PreTrainedTokenizerFast:
    """Return a fixed copy of ``converted``; vocabulary, merges and chat template stay as they are."""
    backend = Tokenizer.from_str(converted.backend_tokenizer.to_str())
    backend.normalizer = None  # an empty Sequence left over from the conversion
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # replaces the BOS-prepending template
    backend.decoder = decoders.ByteLevel()
    # Byte-level BPE can encode every byte, so there is nothing to fall back to and no unknown token.
    backend.model.byte_fallback = False
    backend.model.fuse_unk = False
    backend.model.unk_token = None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        chat_template=converted.chat_template,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,  # it would rewrite " ." to "." and break round trips
    )
