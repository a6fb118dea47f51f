"""The export tools' output, checked the way the server reads it: tokenizers, jinja2 and onnxruntime only."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from support import EXPORT_PYTHON, ROOT

REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.onnx",
    "export.json",
    "manifest.json",
)
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ROUND_TRIP_TEXTS = (
    "Hello, world! It's 2024.",
    "Emoji: 👋🏽 🚀 🇫🇷 and a ZWJ family 👨‍👩‍👧",
    "Accents: café, naïve, façade, Ångström, São Paulo, Dvořák",
    "Arabic: مرحبا بالعالم",
    "Lines\nand\n\nblank lines\r\n\tand a tab",
    "Repeated   spaces    and trailing  ",
    "  leading spaces, <tags> & {braces} and 3.14159",
)


def _json(folder: Path, name: str) -> Any:
    return json.loads((folder / name).read_text())


def _token(config: dict[str, Any], key: str) -> str | None:
    """A special token from tokenizer_config.json, written either as a string or as an AddedToken dict."""
    value = config.get(key)
    return value["content"] if isinstance(value, dict) else value


def _render_chat(folder: Path, messages: list[dict[str, str]]) -> str:
    # The environment transformers' apply_chat_template uses, so ids match those recorded at export.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string((folder / "chat_template.jinja").read_text())
    return template.render(messages=messages, add_generation_prompt=True)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir()}


def _run_export(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "core"))
    command = [EXPORT_PYTHON, "-m", "ai_platform.export", *args]
    return subprocess.run(command, check=True, env=env, capture_output=True, text=True)


# --- the tiny test model ---------------------------------------------------------------------------


def test_tiny_folder_has_every_required_file(tiny_model_dir: Path) -> None:
    assert [name for name in REQUIRED_FILES if not (tiny_model_dir / name).is_file()] == []
    assert _json(tiny_model_dir, "export.json")["recipe"] == "tiny-qwen2"
    assert _json(tiny_model_dir, "config.json")["model_type"] == "qwen2"


def test_tiny_tokenizer_has_chatml_specials(tiny_model_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    config = _json(tiny_model_dir, "tokenizer_config.json")
    ids = {token: tokenizer.token_to_id(token) for token in CHATML_SPECIALS}
    assert None not in ids.values()
    assert _token(config, "eos_token") == "<|im_end|>"
    assert _token(config, "pad_token") == "<|endoftext|>"
    assert _json(tiny_model_dir, "generation_config.json")["eos_token_id"] == ids["<|im_end|>"]
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == ids["<|im_start|>"]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tiny_tokenizer_round_trips(tiny_model_dir: Path, text: str) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_tiny_chat_prompt_encodes_as_at_export(tiny_model_dir: Path) -> None:
    validation = _json(tiny_model_dir, "export.json")["validation"]
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    prompt = _render_chat(tiny_model_dir, validation["messages"])
    assert tokenizer.encode(prompt).ids == validation["prompt_ids"]


def test_tiny_graph_takes_and_returns_a_kv_cache(tiny_model_dir: Path) -> None:
    session = ort.InferenceSession(str(tiny_model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {arg.name for arg in session.get_inputs()}
    outputs = {arg.name for arg in session.get_outputs()}
    layers = _json(tiny_model_dir, "config.json")["num_hidden_layers"]
    cache = {f"{i}.{kind}" for i in range(layers) for kind in ("key", "value")}
    fixed = {"input_ids", "attention_mask", "position_ids", "num_logits_to_keep"}
    assert inputs == fixed | {f"past_key_values.{c}" for c in cache}
    assert outputs == {"logits"} | {f"present.{c}" for c in cache}


def test_tiny_export_is_idempotent(tiny_model_dir: Path) -> None:
    before = _snapshot(tiny_model_dir)
    started = time.monotonic()
    result = _run_export("tiny", "--out", str(tiny_model_dir))
    assert time.monotonic() - started < 5  # no torch import, no rebuild
    assert "up to date" in result.stdout
    assert _snapshot(tiny_model_dir) == before


def test_tiny_incomplete_folder_is_rebuilt_byte_identical(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "export.json").write_bytes((tiny_model_dir / "export.json").read_bytes())
    _run_export("tiny", "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in tiny_model_dir.iterdir())
    for path in tiny_model_dir.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".tiny.")] == [".tiny.lock"]


# --- the SmolLM2 demo model: its GGUF-derived tokenizer is repaired at export ----------------------


@pytest.fixture(scope="module")
def demo_tokenizer(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(demo_model_dir / "tokenizer.json"))


@pytest.mark.demo_model
def test_demo_eos_is_im_end(demo_model_dir: Path, demo_tokenizer: Tokenizer) -> None:
    assert _token(_json(demo_model_dir, "tokenizer_config.json"), "eos_token") == "<|im_end|>"
    assert demo_tokenizer.token_to_id("<|im_end|>") == 2
    assert _json(demo_model_dir, "generation_config.json")["eos_token_id"] == 2


@pytest.mark.demo_model
def test_demo_has_a_pad_token(demo_model_dir: Path, demo_tokenizer: Tokenizer) -> None:
    pad = _token(_json(demo_model_dir, "tokenizer_config.json"), "pad_token")
    assert pad is not None
    assert demo_tokenizer.token_to_id(pad) == _json(demo_model_dir, "generation_config.json")["pad_token_id"]


@pytest.mark.demo_model
def test_demo_chat_prompt_starts_with_one_im_start(demo_model_dir: Path, demo_tokenizer: Tokenizer) -> None:
    prompt = _render_chat(demo_model_dir, [{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\n")
    ids = demo_tokenizer.encode(prompt).ids
    assert ids[:2] == [1, demo_tokenizer.token_to_id("system")]


@pytest.mark.demo_model
def test_demo_chat_prompt_encodes_as_at_export(demo_model_dir: Path, demo_tokenizer: Tokenizer) -> None:
    validation = _json(demo_model_dir, "export.json")["validation"]
    prompt = _render_chat(demo_model_dir, validation["messages"])
    assert demo_tokenizer.encode(prompt).ids == validation["prompt_ids"]


@pytest.mark.demo_model
def test_demo_digits_are_split_individually(demo_tokenizer: Tokenizer) -> None:
    assert demo_tokenizer.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert demo_tokenizer.encode("in 2024").tokens == ["in", "Ġ", "2", "0", "2", "4"]


@pytest.mark.demo_model
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_demo_tokenizer_round_trips(demo_tokenizer: Tokenizer, text: str) -> None:
    assert demo_tokenizer.decode(demo_tokenizer.encode(text).ids) == text
