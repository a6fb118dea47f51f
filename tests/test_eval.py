"""``ai-platform eval`` (issue 12): the metrics on known inputs, the examples the operations ship, the
harness on a fake engine, and the real command on the tiny model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated

import msgspec
import pytest

import ai_platform_classify
import ai_platform_summarize
import ai_platform_translate
from ai_platform import Choice, Choose, Generate, Limits, Message, Operation, ResponseMeta
from ai_platform.evaluation import metrics
from ai_platform.evaluation.evaluate import ModelTarget, evaluate, plan, resolve_model
from ai_platform.evaluation.examples import check_examples, select_examples
from ai_platform.evaluation.report import as_json, table
from ai_platform.evaluation.runner import run_example
from ai_platform.evaluation.scoring import score
from ai_platform.operations import Example, examples_file
from ai_platform.testing import FakeEngine

CLI = str(Path(sys.executable).parent / "ai-platform")
BUILT_IN = {
    "classify": ai_platform_classify.OPERATION,
    "translate": ai_platform_translate.OPERATION,
    "summarize": ai_platform_summarize.OPERATION,
}

# --- metrics: known inputs, known outputs ---------------------------------------------------------------


def test_ece_weighs_each_bins_gap_by_its_share() -> None:
    ece, table_ = metrics.expected_calibration_error([0.95, 0.85, 0.65, 0.25], [True, False, True, False])
    # one example per bin: (|1-.95| + |0-.85| + |1-.65| + |0-.25|) / 4
    assert ece == pytest.approx(0.375)
    assert [b.count for b in table_] == [0, 0, 1, 0, 0, 0, 1, 0, 1, 1]
    assert table_[8].mean_confidence == pytest.approx(0.85) and table_[8].accuracy == 0.0
    ece, _ = metrics.expected_calibration_error([0.9, 0.9, 0.5, 0.5], [True, False, True, True])
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.5))  # 0.45
    ece, table_ = metrics.expected_calibration_error([1.0, 0.5, 0.5], [True, True, False])
    assert ece == pytest.approx(0.0) and table_[-1].count == 1  # 1.0 lands in the last bin
    with pytest.raises(ValueError, match="not a probability"):
        metrics.expected_calibration_error([1.2], [True])


def test_classification_metrics() -> None:
    result = metrics.classification(["a", "a", "b", "c"], ["a", "b", "b", None], [0.9, 0.6, 0.8, None])
    assert result["accuracy"] == pytest.approx(0.5)
    # F1: a = 2/3 (precision 1, recall 1/2), b = 2/3 (1/2, 1), c = 0 (the failed example); macro = 4/9
    assert result["macro_f1"] == pytest.approx(4 / 9)
    # ECE over the three answers with a confidence: bins 9 (.9, right), 6 (.6, wrong), 8 (.8, right)
    assert result["ece"] == pytest.approx((0.1 + 0.6 + 0.2) / 3)


def test_fit_temperature_finds_the_log_loss_optimum() -> None:
    # Two labels, scores 1 and 0, right 3 times in 4: the log-loss is least where
    # sigmoid(1 / T) = 3/4, at T = 1 / ln 3.
    scores = [[1.0, 0.0]] * 4
    assert metrics.fit_temperature(scores, [0, 0, 0, 1]) == pytest.approx(1 / math.log(3), rel=1e-3)
    # Always right: as sure as the search allows; right half the time: as unsure.
    assert metrics.fit_temperature(scores, [0, 0, 0, 0]) == pytest.approx(0.01, rel=1e-2)
    assert metrics.fit_temperature(scores, [0, 1, 0, 1]) == pytest.approx(100, rel=1e-2)
    with pytest.raises(ValueError, match="same length"):
        metrics.fit_temperature(scores, [0])


def test_chrf_and_rouge_l() -> None:
    assert metrics.chrf(["Le chat dort.", "猫在垫子上。"], ["Le chat dort.", "猫在垫子上。"]) == pytest.approx(100.0)
    assert metrics.chrf(["xyz"], ["abc"]) == pytest.approx(0.0)
    assert 0 < metrics.sentence_chrf("猫在垫子上。", "猫坐在垫子上。") < 100  # characters: no tokenizer needed
    # LCS 5 of a 5-token prediction and a 6-token reference: P = 1, R = 5/6, F = 10/11
    [f] = metrics.rouge_l(["the cat on the mat"], ["the cat sat on the mat"])
    assert f == pytest.approx(10 / 11)
    assert metrics.rouge_l(["cats running"], ["cat runs"]) == [pytest.approx(1.0)]  # Porter stemming, no nltk data


def test_sentence_count_and_percentile() -> None:
    assert metrics.count_sentences("One. Two! Three?") == 3
    assert metrics.count_sentences("A 1.8-metre calf was born.\nShe is well") == 2
    assert metrics.count_sentences("") == 0
    assert metrics.percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)


def test_metrics_download_nothing() -> None:
    """rouge-score's stemmer and sacrebleu's chrF need no data file (air-gapped): run with no nltk data at all."""
    code = (
        "from ai_platform.evaluation import metrics\n"
        "assert metrics.rouge_l(['runs'], ['running']) == [1.0]\n"
        "assert metrics.chrf(['a b'], ['a b']) == 100.0\n"
    )
    env = dict(os.environ, NLTK_DATA="/nonexistent", HOME="/nonexistent", SACREBLEU="/nonexistent")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


# --- the examples the built-in operations ship -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_built_in_examples_match_their_schemas(name: str) -> None:
    operation = BUILT_IN[name]
    assert callable(operation.examples)  # a data file, read on first use: startup reads nothing
    examples = check_examples(operation)
    heldout = [e for e in examples if e.split == "heldout"]
    assert 0.25 <= len(heldout) / len(examples) <= 0.4, "about a third is held out"


def test_classification_examples_cover_label_sets_of_several_kinds() -> None:
    examples = check_examples(BUILT_IN["classify"])
    assert len(examples) >= 60
    label_sets = Counter(tuple(e.request["categories"]) for e in examples)
    assert len(label_sets) >= 6
    assert all(e.expected["label"] in e.request["categories"] for e in examples)
    labels = {label for labels in label_sets for label in labels}
    assert sum(1 for label in labels if len(label.split()) >= 3) >= 3  # labels of several tokens
    shared = [s for s in label_sets if len({label.split()[0] for label in s}) < len(s)]
    assert len(shared) >= 2  # sets whose labels share a first token ("card ...", "request for ...")
    for label_set in label_sets:  # every label set has held-out texts
        assert any(e.split == "heldout" for e in examples if tuple(e.request["categories"]) == label_set)
    assert any(not e.request["text"].isascii() for e in examples)  # not only English


def test_translation_examples_go_both_ways() -> None:
    examples = check_examples(BUILT_IN["translate"])
    assert len(examples) >= 40
    directions = Counter((e.request["source_language"], e.request["target_language"]) for e in examples)
    languages = {lang for pair in directions for lang in pair} - {"en"}
    assert {"ar", "zh", "fr", "de", "es"} <= languages and len(languages) >= 6
    for language in languages:
        assert ("en", language) in directions and (language, "en") in directions, language
        for pair in (("en", language), (language, "en")):
            assert any(
                e.split == "heldout"
                for e in examples
                if (e.request["source_language"], e.request["target_language"]) == pair
            )


def test_summaries_respect_their_max_sentences() -> None:
    examples = check_examples(BUILT_IN["summarize"])
    assert len(examples) >= 20
    assert len({e.request["max_sentences"] for e in examples}) >= 3
    assert len({e.request["max_sentences"] for e in examples if e.split == "heldout"}) >= 3
    for example in examples:
        reference = example.expected["summary"]
        assert metrics.count_sentences(reference) == example.request["max_sentences"], example.id
        assert len(reference) < len(example.request["text"]), example.id


def test_example_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split must be one of dev, heldout"):
        Example(request={"text": "x"}, split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="request must be a mapping"):
        Example(request="x")  # type: ignore[arg-type]
    package = tmp_path / "pkg_examples_demo"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "examples.jsonl").write_text(
        '{"request": {"text": "a"}, "expected": {"label": "x"}}\n\n{"request": 3}\n'
    )
    sys.path.insert(0, str(tmp_path))
    try:
        load = examples_file("pkg_examples_demo")
        with pytest.raises(ValueError, match=r"examples\.jsonl, line 3"):
            load()
    finally:
        sys.path.remove(str(tmp_path))


def test_select_examples_spreads_a_limit_over_the_list() -> None:
    operation = BUILT_IN["classify"]
    sample = select_examples(operation, "all", 7)
    assert len(sample) == 7
    assert len({tuple(e.request["categories"]) for _, e in sample}) == 7  # one per label set, not seven of the first
    assert all(e.split == "heldout" for _, e in select_examples(operation, "heldout"))
    assert len(select_examples(operation, "dev")) + len(select_examples(operation, "heldout")) == len(
        select_examples(operation)
    )


# --- the harness on a fake engine -----------------------------------------------------------------------


class EchoRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class EchoResponse(msgspec.Struct, kw_only=True):
    translated_text: str
    meta: ResponseMeta


ECHO = Operation(
    name="echo",
    summary="test",
    request_type=EchoRequest,
    response_type=EchoResponse,
    limits=Limits(max_input_chars=200, max_output_tokens=20),
    prompt=lambda r: Generate(messages=[Message("user", r.text)]),
    respond=lambda r, result, meta: EchoResponse(translated_text=result.text, meta=meta),
    examples=(
        Example(id="hello", request={"text": "hi"}, expected={"translated_text": "Bonjour tout le monde."}),
        Example(
            id="bye", request={"text": "bye"}, expected={"translated_text": "Bonjour tout le monde."}, split="heldout"
        ),
    ),
)


class Engines:
    """An engine factory: the folder named 'good' answers the reference text, any other folder something else."""

    def __init__(self) -> None:
        self.built: list[tuple[str, dict[str, str]]] = []

    def __call__(self, models_dir: Path, operation_models: dict[str, str]) -> FakeEngine:
        folder = next(iter(operation_models.values()))
        self.built.append((folder, dict(operation_models)))
        answer = "Bonjour tout le monde." if folder == "good" else "Au revoir."
        return FakeEngine(models=dict(operation_models), answer=answer)


@pytest.mark.anyio
async def test_evaluate_scores_models_against_the_reference(tmp_path: Path) -> None:
    good, other = ModelTarget("good", tmp_path / "good"), ModelTarget("other", tmp_path / "other")
    good.path.mkdir()
    (good.path / "export.json").write_text('{"precision": "fp32"}')  # "other" records none
    operations = {"echo": ECHO, "classify": BUILT_IN["classify"]}
    work = plan(list(operations), [other], {}, good)
    assert [(t.label, ops) for t, ops in work] == [("good", ["echo", "classify"]), ("other", ["echo", "classify"])]
    factory = Engines()
    seen: list[str] = []
    rows = await evaluate(operations, work, factory, split="all", limit=None, reference=good, progress=seen.append)
    assert [(r.operation, r.model.label, r.is_reference) for r in rows] == [
        ("echo", "good", True), ("echo", "other", False), ("classify", "good", True), ("classify", "other", False),
    ]  # fmt: skip
    assert len(seen) == 2 * (2 + len(BUILT_IN["classify"].load_examples()))
    echo_good, echo_other, classify_good, classify_other = rows
    assert echo_good.score is not None and echo_good.score.value == pytest.approx(100.0)
    assert echo_other.score is not None and echo_other.delta == pytest.approx(echo_other.score.value - 100.0)
    assert echo_other.delta < -50
    assert echo_good.tokens_per_second is not None and echo_good.mean_ms is not None and echo_good.p95_ms is not None
    # classify on the fake engine (it favours options that occur in the text): scored as classification
    assert classify_good.score is not None and classify_good.score.metric == "accuracy"
    assert {"macro_f1", "ece"} <= classify_good.score.details.keys() and classify_good.score.reliability
    assert classify_good.tokens_per_second is None and classify_other.delta == pytest.approx(0.0)
    assert [r.precision for r in rows] == ["fp32", None, "fp32", None]  # read as GET /health reads it
    text = table(rows)
    assert text.splitlines()[0].split()[:4] == ["OPERATION", "MODEL", "PRECISION", "N"]
    assert text.splitlines()[1].split()[:3] == ["echo", "good", "fp32"]
    assert text.splitlines()[2].split()[:3] == ["echo", "other", "-"]
    assert "(ref)" in text and "Reliability of classify on good" in text
    body = json.loads(json.dumps(as_json(rows, split="all", limit=None)))
    assert body["reference"] == "good"
    assert [r["precision"] for r in body["results"]] == ["fp32", None, "fp32", None]
    first = body["results"][1]
    assert first["operation"] == "echo" and first["delta_vs_reference"] < -50
    assert first["runs"][0]["response"] == {"translated_text": "Au revoir."}
    assert first["runs"][1]["split"] == "heldout" and "chrf" in first["runs"][1]["judged"]["translated_text"]


@pytest.mark.anyio
async def test_failures_are_recorded_and_counted_wrong() -> None:
    engine = FakeEngine(models={"classify": "m"}, fail_with=RuntimeError("boom"))
    [(_, example)] = select_examples(BUILT_IN["classify"], "all", 1)
    run = await run_example(BUILT_IN["classify"], example, engine, example_id="x")
    assert not run.ok and run.error == "RuntimeError: boom"
    result = score("classify", [run])
    assert result.value == 0.0 and result.per_example["x"]["predicted"] is None
    engine = FakeEngine(models={"echo": "m"}, max_prompt_chars=1)  # the engine's check refuses the prompt
    run = await run_example(ECHO, ECHO.load_examples()[0], engine)
    assert run.error is not None and run.error.startswith("422: Input is too long")


@pytest.mark.anyio
async def test_summaries_score_rouge_l_and_count_the_models_own_sentences() -> None:
    operation = BUILT_IN["summarize"]
    [(example_id, example)] = select_examples(operation, "all", 1)  # max_sentences 1
    reference = example.expected["summary"]
    engine = FakeEngine(models={"summarize": "m"}, answer=f"{reference} An extra sentence.")
    run = await run_example(operation, example, engine, example_id=example_id)
    assert run.response.summary == reference  # the operation cut the extra sentence ...
    result = score("summarize", [run])
    assert result.metric == "ROUGE-L" and result.value == pytest.approx(100.0)
    assert result.details["sentence_compliance"] == 0.0  # ... but the model wrote two: not compliant
    assert result.per_example[example_id]["model_sentences"] == 2


def test_resolve_model(tmp_path: Path) -> None:
    (tmp_path / "models" / "qwen-int4").mkdir(parents=True)
    assert resolve_model("qwen-int4", tmp_path / "models").path == tmp_path / "models" / "qwen-int4"
    assert resolve_model(str(tmp_path / "models" / "qwen-int4"), tmp_path / "x").label.endswith("qwen-int4")
    with pytest.raises(ValueError, match="not found"):
        resolve_model("missing", tmp_path / "models")


def test_choose_operations_without_confidence_use_the_chosen_probability() -> None:
    from ai_platform.evaluation.runner import ExampleRun

    class R(msgspec.Struct):
        sentiment: str

    example = Example(request={"text": "x"}, expected={"sentiment": "good"})
    run = ExampleRun(id="a", example=example, call=Choose(messages=[Message("user", "x")], options=["good", "bad"]),
                     result=Choice(scores={"good": 0.7, "bad": 0.3}, output_tokens=1), response=R(sentiment="good"))  # fmt: skip
    result = score("sentiment", [run])
    assert result.value == 100.0 and result.per_example["a"]["confidence"] == 0.7
    assert result.details["ece"] == pytest.approx(0.3)


# --- the real command ------------------------------------------------------------------------------------


def eval_env(tmp_path: Path, models_dir: Path, **extra: str) -> dict[str, str]:
    """Plugin and model settings only, in a folder without ``.env``: eval needs no SECRET_KEY, keys or database."""
    path = os.environ.get("PATH", "/usr/bin:/bin")
    return {"PATH": path, "HOME": str(tmp_path), "MODELS_DIR": str(models_dir), **extra}


def test_eval_command_on_the_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Every built-in operation and the third-party sentiment plugin's examples, on the real runtime; a copy
    of the same folder as the reference scores exactly the same (greedy decoding is deterministic)."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(tiny_model_dir, models / "tiny")
    shutil.copytree(tiny_model_dir, models / "tiny-copy")
    env = eval_env(tmp_path, models, ENABLED_PLUGINS="summarize,translate,classify,sentiment")
    args = ["eval", "--model", "tiny", "--reference", "tiny-copy", "--limit", "2", "--no-progress"]
    result = subprocess.run([CLI, *args, "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["reference"] == "tiny-copy" and body["limit"] == 2
    rows = {(r["operation"], r["model"]): r for r in body["results"]}
    assert set(rows) == {
        (op, m) for op in ("summarize", "translate", "classify", "sentiment") for m in ("tiny", "tiny-copy")
    }
    for (_, model), row in rows.items():
        assert row["examples"] == 2 and row["errors"] == 0, row
        assert row["score"] is not None and row["latency_ms"]["mean"] > 0 and row["latency_ms"]["p95"] > 0
        assert row["is_reference"] == (model == "tiny-copy") and row["precision"] == "fp32"
        if model == "tiny":
            assert row["delta_vs_reference"] == pytest.approx(0.0)
    assert rows[("classify", "tiny")]["metric"] == rows[("sentiment", "tiny")]["metric"] == "accuracy"
    assert (
        rows[("translate", "tiny")]["metric"] == "chrF" and rows[("translate", "tiny")]["output_tokens_per_second"] > 0
    )
    assert rows[("summarize", "tiny")]["metric"] == "ROUGE-L"
    assert "sentence_compliance" in rows[("summarize", "tiny")]["details"]

    table_run = subprocess.run(
        [CLI, *args, "--operation", "classify", "--split", "heldout"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert table_run.returncode == 0, table_run.stderr
    lines = table_run.stdout.splitlines()
    assert lines[0] == "ai-platform eval: split heldout, at most 2 per operation"
    assert lines[1].split()[:5] == ["OPERATION", "MODEL", "PRECISION", "N", "ERR"]
    assert lines[2].split()[:3] == ["classify", "tiny-copy", "fp32"] and lines[2].rstrip().endswith("(ref)")
    assert lines[3].split()[:3] == ["classify", "tiny", "fp32"] and lines[3].rstrip().endswith("+0.0")


def test_eval_command_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    env = eval_env(tmp_path, tmp_path, ENABLED_PLUGINS="summarize,translate,classify")
    result = subprocess.run([CLI, "eval", "--operation", "nope"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "unknown operation nope; available: " in result.stderr
    result = subprocess.run([CLI, "eval", "--model", "missing"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "model folder 'missing' not found" in result.stderr


def test_eval_reports_a_folder_that_does_not_load(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    env = eval_env(tmp_path, tmp_path, ENABLED_PLUGINS="classify")
    result = subprocess.run(
        [CLI, "eval", "--model", "broken", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "model not loaded" in result.stdout
