"""The maths of an export's agreement with its fp32 source (``ai_platform.export.agreement``), on distributions
whose top-1 agreement and KL divergence are known by hand, and the threshold that judges them."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest

from ai_platform.cli import main as cli_main
from ai_platform.export.agreement import MAX_MEAN_KL, MIN_TOP1, Agreement, Threshold, log_softmax, measure
from ai_platform.export.calibration import TEXT


def logits_of(*rows: list[float]) -> np.ndarray:
    """Logits whose softmax is each row of probabilities (the log of a distribution is one of its logit vectors)."""
    return np.log(np.array(rows, dtype=np.float64)).astype(np.float32)


def test_log_softmax_is_stable_and_normalised() -> None:
    rows = log_softmax(np.array([[1000.0, 1000.0], [0.0, math.log(3)]], dtype=np.float32))
    assert np.allclose(np.exp(rows), [[0.5, 0.5], [0.25, 0.75]])
    assert rows.dtype == np.float64


def test_identical_distributions_agree_fully() -> None:
    reference = logits_of([0.7, 0.2, 0.1], [0.1, 0.1, 0.8])
    result = measure(reference, reference.copy())
    assert result == Agreement(positions=2, top1=1.0, mean_kl=0.0, max_logit_diff=0.0)


def test_kl_of_two_known_distributions() -> None:
    # KL(P || Q) for P = (1/2, 1/2), Q = (1/4, 3/4): 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    result = measure(logits_of([0.5, 0.5]), logits_of([0.25, 0.75]))
    assert result.mean_kl == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # The other way round it differs: the reference's distribution is the one the expectation is over.
    # KL(Q || P) = 1/4 ln(1/2) + 3/4 ln(3/2).
    reverse = measure(logits_of([0.25, 0.75]), logits_of([0.5, 0.5]))
    assert reverse.mean_kl == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-6)


def test_kl_is_averaged_over_positions_and_ignores_a_logit_offset() -> None:
    reference = logits_of([0.5, 0.5], [0.9, 0.1])
    # Position 1 equal but every logit shifted by 7 (the same distribution): it adds nothing to the KL.
    exported = np.stack([logits_of([0.25, 0.75])[0], reference[1] + 7])
    result = measure(reference, exported)
    assert result.mean_kl == pytest.approx(0.5 * math.log(4 / 3) / 2, rel=1e-5)
    assert result.max_logit_diff == pytest.approx(7, rel=1e-6)


def test_top1_agreement_counts_positions_with_the_same_first_token() -> None:
    reference = logits_of([0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.4, 0.35, 0.25])
    exported = logits_of([0.5, 0.4, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.45, 0.25])  # last one flips
    result = measure(reference, exported)
    assert (result.positions, result.top1) == (4, 0.75)
    assert result.mean_kl > 0


def test_many_positions_are_measured_in_blocks_as_one() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(300, 50)).astype(np.float32)
    exported = reference + rng.normal(scale=0.5, size=reference.shape).astype(np.float32)
    result = measure(reference, exported)
    log_p, log_q = log_softmax(reference), log_softmax(exported)
    expected_kl = float((np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean())
    expected_top1 = float((reference.argmax(-1) == exported.argmax(-1)).mean())
    assert result.mean_kl == pytest.approx(expected_kl, rel=1e-9)
    assert result.top1 == pytest.approx(expected_top1)
    assert result.max_logit_diff == pytest.approx(float(np.abs(reference - exported).max()))


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="positions, vocab"):
        measure(np.zeros((3, 5), np.float32), np.zeros((3, 6), np.float32))


def test_threshold_names_each_shortfall() -> None:
    threshold = Threshold(min_top1=0.9, max_mean_kl=0.1)
    good = Agreement(positions=300, top1=0.95, mean_kl=0.05, max_logit_diff=3.0)
    assert threshold.shortfalls(good) == []
    assert threshold.shortfalls(Agreement(positions=300, top1=0.9, mean_kl=0.1, max_logit_diff=3.0)) == []
    bad = Agreement(positions=300, top1=0.5, mean_kl=2.0, max_logit_diff=20.0)
    assert threshold.shortfalls(bad) == ["top-1 agreement 0.500 < 0.9", "mean KL 2 > 0.1"]
    assert threshold.shortfalls(Agreement(positions=300, top1=1.0, mean_kl=math.nan, max_logit_diff=0)) != []


def test_calibration_text_is_multilingual_prose_of_enough_words() -> None:
    assert len(TEXT.split()) >= 256  # positions are tokens: any tokenizer gives at least one per word
    for script in (r"[\u4e00-\u9fff]", r"[\u0600-\u06ff]", r"[\u0400-\u04ff]", "é", "ß", "ñ"):
        assert re.search(script, TEXT), script


def test_models_export_help_states_the_exporters_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    # The server's CLI does not import the exporter's numpy module for its help; its numbers must not drift.
    with pytest.raises(SystemExit):
        cli_main(["models", "export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {MIN_TOP1})" in text
    assert f"(default: {MAX_MEAN_KL})" in text


def test_the_server_reads_export_records_without_the_export_tools() -> None:
    """/health reads export.json in the server's environment, which has no torch, onnx, transformers or tqdm."""
    script = (
        "import sys\n"
        "for name in ('torch', 'onnx', 'transformers', 'optimum', 'tqdm'): sys.modules[name] = None\n"
        "import ai_platform.api.routes_system\n"
        "from ai_platform.export.model_folder import read_export_record\n"
        "from pathlib import Path\n"
        "print(read_export_record(Path(sys.argv[1])))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, "/nonexistent"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "None\n"
