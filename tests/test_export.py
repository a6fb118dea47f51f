"""The export tools' output, checked the way the server reads it: tokenizers, jinja2 and onnxruntime only."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ai_platform.runtime.manifest import verify_manifest
from ai_platform.runtime.model import LanguageModel
from runtime_reference import greedy_generate
from support import EXPORT_PYTHON, ROOT, genai_args

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
AGREEMENT_FIELDS = {"reference", "positions", "top1", "mean_kl", "max_logit_diff", "min_top1", "max_mean_kl", "passed"}
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


def _export_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "core"))


def _run_export(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [EXPORT_PYTHON, "-m", "ai_platform.export", *args]
    return subprocess.run(command, check=check, env=_export_env(), capture_output=True, text=True)


def _export_python(script: str, *args: str) -> str:
    """Run ``script`` in the export environment (onnx, the exporter's modules); returns its stdout."""
    command = [EXPORT_PYTHON, "-c", script, *args]
    return subprocess.run(command, check=True, env=_export_env(), capture_output=True, text=True).stdout


def _weights_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("model.onnx*"))


# --- the tiny test model ---------------------------------------------------------------------------


def test_tiny_folder_has_every_required_file(tiny_model_dir: Path) -> None:
    assert [name for name in REQUIRED_FILES if not (tiny_model_dir / name).is_file()] == []
    assert _json(tiny_model_dir, "export.json")["recipe"] == "tiny-qwen2"
    assert _json(tiny_model_dir, "config.json")["model_type"] == "qwen2"


def test_tiny_export_records_its_agreement_with_torch(tiny_model_dir: Path) -> None:
    agreement = _json(tiny_model_dir, "export.json")["agreement"]
    assert set(agreement) == AGREEMENT_FIELDS
    assert agreement["reference"] == "torch fp32"
    assert agreement["positions"] >= 256  # the calibration text, in this model's tokens
    # fp32 on both sides: the same graph up to rounding.
    assert agreement["top1"] == 1.0 and agreement["mean_kl"] < 1e-6 and agreement["max_logit_diff"] < 1e-3
    assert agreement["passed"] is True


def test_an_export_below_the_threshold_is_warned_about_or_refused(tiny_model_dir: Path) -> None:
    """An up-to-date folder is judged on the agreement it recorded; --strict exits 1 and leaves it as it is."""
    before = _snapshot(tiny_model_dir)
    warned = _run_export("tiny", "--out", str(tiny_model_dir), "--max-kl", "0")  # no KL is below 0
    assert "up to date" in warned.stdout
    assert "warning: mean KL" in warned.stderr and "> 0 " in warned.stderr
    refused = _run_export("tiny", "--out", str(tiny_model_dir), "--max-kl", "0", "--strict", check=False)
    assert refused.returncode == 1
    assert "refused (--strict): mean KL" in refused.stderr.splitlines()[-1]
    assert _snapshot(tiny_model_dir) == before


def test_strict_refuses_a_new_export_below_the_threshold_and_publishes_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, out)  # an earlier build stays servable as it was
    before = _snapshot(out)
    command = ("tiny", "--precision", "int8", "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    result = _run_export(*command, "--strict", "--min-top1", "1", "--max-kl", "0", check=False)
    assert result.returncode == 1
    error = result.stderr.splitlines()[-1]
    assert error.startswith(f"export of {out}: refused (--strict): top-1 agreement "), error
    assert "mean KL" in error and "nothing was published" in error
    assert _snapshot(out) == before
    assert _json(out, "export.json")["precision"] == "fp32"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".tiny.lock", "cache", "tiny"]  # no .tiny.partial
    assert list((tmp_path / "cache" / "export-work").iterdir()) == []


def test_models_export_passes_the_threshold_and_strict_to_the_exporter(tmp_path: Path) -> None:
    """``ai-platform models export`` (the admin's command, on a Hugging Face folder) refuses the same way."""
    script = (
        "import sys; from pathlib import Path; from ai_platform.export import tiny;"
        "from ai_platform.export.progress import Progress; print(tiny.prepare(Path(sys.argv[1]), Progress()))"
    )
    source = _export_python(script, str(tmp_path / "work")).splitlines()[-1]
    command = [str(Path(sys.executable).parent / "ai-platform"), "models", "export", source, "tiny-int8"]
    command += ["--format", "optimum", "--precision", "int8", "--models-dir", str(tmp_path / "models")]
    environment = dict(os.environ, AI_PLATFORM_EXPORT_PYTHON=EXPORT_PYTHON)
    thresholds = ["--min-top1", "0", "--max-kl", "0"]  # only the KL can miss
    result = subprocess.run([*command, *thresholds, "--strict"], env=environment, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "refused (--strict): mean KL" in result.stderr.splitlines()[-1]
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == [".tiny-int8.lock"]


def test_models_export_passes_builder_options_to_the_exporter(tmp_path: Path) -> None:
    """The exporter, not the CLI, checks them: an option that needs the genai format is refused by it.

    Run where there is no ``.env`` and no key is set: exporting reads only MODELS_DIR, no secrets.
    """
    command = [str(Path(sys.executable).parent / "ai-platform"), "models", "export", str(tmp_path), "x"]
    command += ["--format", "optimum", "--builder-option", "int4_block_size=32"]
    environment = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "VALID_API_KEYS")}
    environment.update(AI_PLATFORM_EXPORT_PYTHON=EXPORT_PYTHON, MODELS_DIR=str(tmp_path / "models"))
    result = subprocess.run(command, env=environment, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert "--builder-option needs --format genai" in result.stderr


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
    result = _run_export("tiny", "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert "\r" not in result.stdout + result.stderr  # no progress bars: stderr is a pipe here, as in CI logs
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


# --- quantized exports of the tiny model -----------------------------------------------------------

QUANTIZED = [("optimum", "int8"), ("optimum", "int4"), ("genai", "int8"), ("genai", "int4")]
BITS = {"int8": [8], "int4": [4]}
# The builder's int4 default keeps the lm_head and the most sensitive layers' matmuls at 8 bits.
GENAI_INT4_BITS = [4, 8]
# The bit widths of a graph's MatMulNBits nodes, and the MatMuls still multiplying by constant (fp32) weights.
GRAPH_SUMMARY = """
import json, sys, onnx
graph = onnx.load(sys.argv[1], load_external_data=False).graph
constants = {tensor.name for tensor in graph.initializer}
print(json.dumps({
    "bits": sorted({a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}),
    "fp32_weights": [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants],
}))
"""


@pytest.fixture(scope="module", params=QUANTIZED, ids=[f"{f}-{p}" for f, p in QUANTIZED])
def quantized(request: pytest.FixtureRequest, tiny_model_dir: Path) -> tuple[Path, Path, str]:
    """(the tiny model at a quantized precision, its fp32 build in the same format, the precision)."""
    export_format, precision = request.param
    fp32, extra = tiny_model_dir, []
    if export_format == "genai":
        fp32, extra = tiny_model_dir.parent / "tiny-qwen2-genai", genai_args()
        _run_export("tiny", "--format", "genai", "--out", str(fp32), *extra)  # as the runtime tests build it
    out = tiny_model_dir.parent / f"tiny-qwen2-{export_format}-{precision}"
    _run_export("tiny", "--format", export_format, "--precision", precision, "--out", str(out), *extra)
    return out, fp32, precision


def _model_file(folder: Path) -> Path:
    genai_config = folder / "genai_config.json"
    if genai_config.is_file():
        return folder / _json(folder, "genai_config.json")["model"]["decoder"]["filename"]
    return folder / "model.onnx"


def test_quantized_folder_matches_its_manifest(quantized: tuple[Path, Path, str]) -> None:
    folder, _, precision = quantized
    assert verify_manifest(folder)
    assert _json(folder, "export.json")["precision"] == precision


def test_quantized_folder_records_its_agreement(quantized: tuple[Path, Path, str]) -> None:
    folder, fp32, _ = quantized
    agreement = _json(folder, "export.json")["agreement"]
    assert set(agreement) == AGREEMENT_FIELDS
    assert agreement["positions"] == _json(fp32, "export.json")["agreement"]["positions"]
    assert 0 <= agreement["top1"] <= 1 and agreement["mean_kl"] > 0
    meets = agreement["top1"] >= agreement["min_top1"] and agreement["mean_kl"] <= agreement["max_mean_kl"]
    assert agreement["passed"] is meets  # built without --strict: published either way, the verdict recorded


def test_quantized_graph_multiplies_by_quantized_weights_only(quantized: tuple[Path, Path, str]) -> None:
    folder, fp32, precision = quantized
    summary = json.loads(_export_python(GRAPH_SUMMARY, str(_model_file(folder))))
    genai_int4 = precision == "int4" and (folder / "genai_config.json").is_file()
    assert summary["bits"] == (GENAI_INT4_BITS if genai_int4 else BITS[precision])
    assert summary["fp32_weights"] == []  # the tied lm_head included
    assert _weights_size(folder) < _weights_size(fp32)


def test_genai_folder_records_the_builder_options_it_was_built_with(quantized: tuple[Path, Path, str]) -> None:
    folder, _, precision = quantized
    record = _json(folder, "export.json")
    if record["format"] != "genai":
        assert "builder_options" not in record
        return
    script = "import json; from ai_platform.export.genai_builder import INT4_DEFAULTS; print(json.dumps(INT4_DEFAULTS))"
    # An int8 folder built before the field existed is still current (its options did not change): none recorded.
    assert record.get("builder_options", {}) == (json.loads(_export_python(script)) if precision == "int4" else {})


def test_builder_options_override_the_int4_defaults(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An option changes the recipe version (a rebuild); the folder records the options it was built with."""
    out = tmp_path / "tiny"
    option = ["--builder-option", "algo_config=default", "--builder-option", "matmul_mixed_precision="]
    common = ["--format", "genai", "--precision", "int4", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    _run_export("tiny", *common, *genai_args(), *option)
    record = _json(out, "export.json")
    assert record["builder_options"]["algo_config"] == "default"
    summary = json.loads(_export_python(GRAPH_SUMMARY, str(_model_file(out))))
    assert summary["bits"] == [4]  # nothing kept at 8 bits
    assert record["version"] != _json(tiny_model_dir.parent / "tiny-qwen2-genai-int4", "export.json")["version"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--builder-option", "exclude_embeds=true"], "unknown builder option exclude_embeds"),
        (["--builder-option", "block_size"], "'block_size' is not KEY=VALUE"),
        (["--precision", "fp32", "--builder-option", "block_size=64"], "need --precision int8 or int4"),
        (["--format", "optimum", "--precision", "int4", "--builder-option", "block_size=64"], "needs --format genai"),
    ],
)
def test_bad_builder_options_are_refused_before_building(tmp_path: Path, arguments: list[str], message: str) -> None:
    args = ["--format", "genai", "--precision", "int4", *arguments]
    result = _run_export("tiny", *args, "--out", str(tmp_path / "tiny"), check=False)
    assert result.returncode != 0
    assert message in result.stderr.splitlines()[-1]
    assert not (tmp_path / "tiny").exists()


def test_quantized_model_generates_its_export_reference(quantized: tuple[Path, Path, str]) -> None:
    folder, _, _ = quantized
    reference = _json(folder, "export.json")["validation"]
    model = LanguageModel.load(folder, execution_provider="cpu", intra_op_threads=1)
    expected = reference["greedy_ids"]  # recorded from the ONNX graph, not stopping at eos
    result = greedy_generate(model.decoder, reference["prompt_ids"], max_new_tokens=len(expected), eos_ids=())
    assert result.tokens == expected


def test_quantization_keeps_external_weights_external(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Graphs over 2 GB keep their weights in a file of their own; the quantized graph must too.
    script = """
import sys, onnx
from pathlib import Path
from ai_platform.export.quantize import quantize
folder, work = Path(sys.argv[2]), Path(sys.argv[3])
onnx.save(onnx.load(sys.argv[1]), folder / "model.onnx", save_as_external_data=True, location="model.onnx_data")
quantize(folder / "model.onnx", "int4", work)
"""
    folder, work = tmp_path / "model", tmp_path / "work"
    folder.mkdir()
    work.mkdir()
    _export_python(script, str(tiny_model_dir / "model.onnx"), str(folder), str(work))
    assert sorted(path.name for path in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "num_logits_to_keep" in {arg.name for arg in session.get_inputs()}


def test_unsupported_precision_names_the_supported_ones(tmp_path: Path) -> None:
    result = _run_export("tiny", "--precision", "fp16", "--out", str(tmp_path / "tiny"), check=False)
    assert result.returncode != 0
    error = result.stderr.splitlines()[-1]
    assert "invalid choice: 'fp16'" in error
    assert all(precision in error for precision in ("fp32", "int8", "int4"))
    assert not (tmp_path / "tiny").exists()


def test_progress_bars_are_drawn_on_a_terminal_only() -> None:
    script = (
        "from ai_platform.export.progress import bar\nwith bar('sha256', 1 << 20, 'B') as done: done.update(1 << 20)"
    )
    command = [EXPORT_PYTHON, "-c", script]
    terminal, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("4H", 24, 80, 0, 0))  # a new pty has 0 columns
    subprocess.run(command, check=True, env=_export_env(), stderr=child)
    os.close(child)
    drawn = os.read(terminal, 1 << 16).decode()
    os.close(terminal)
    assert "sha256" in drawn
    assert subprocess.run(command, check=True, env=_export_env(), capture_output=True, text=True).stderr == ""
