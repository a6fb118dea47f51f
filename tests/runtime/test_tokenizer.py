"""Chat template rendering and prompt encoding (no transformers at run time)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer

from ai_platform.operations import Message
from ai_platform.runtime.tokenizer import ChatTokenizer

# SmolLM2-Instruct's template: ChatML with a default system message.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


def test_chatml_prompt_is_rendered_and_encoded_without_extra_special_tokens(tokenizer: Tokenizer) -> None:
    chat = ChatTokenizer(tokenizer, CHATML, {"eos_token": "<|im_end|>"})
    text = chat.render([Message("user", "Hello world")])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n"
        "<|im_start|>user\nHello world<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = chat.encode(text)
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    assert im_start is not None and im_end is not None
    assert ids[0] == im_start  # nothing prepended
    assert ids.count(im_start) == 3
    assert ids.count(im_end) == 2
    assert chat.eos_token_id == im_end
    assert chat.decode(ids) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_template_sees_special_tokens_and_transformers_helpers(tokenizer: Tokenizer) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m.role not in ['system', 'user'] %}{{ raise_exception('unknown role ' + m.role) }}{% endif %}"
        "{{ m | tojson }}{{ eos_token }}{% endfor %}"
    )
    chat = ChatTokenizer(tokenizer, template, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    assert chat.render([Message("user", "a<b é")]) == '<|im_start|>{"role": "user", "content": "a<b é"}<|im_end|>'
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        chat.render([Message("tool", "x")])


def test_template_and_tokens_from_tokenizer_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"eos_token": {"content": "<|im_end|>", "special": True}, "chat_template": CHATML}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    chat = ChatTokenizer.from_folder(tmp_path)
    assert chat.eos_token_id == Tokenizer.from_file(str(tmp_path / "tokenizer.json")).token_to_id("<|im_end|>")
    assert chat.render([Message("system", "S")]) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>assistant\n"


def test_folder_without_chat_template_is_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="no chat template"):
        ChatTokenizer.from_folder(tmp_path)
