"""The paper's metrics on hand-computed cases."""

import math

import pytest

from gallop_kernels.metrics import (
    collapse_rate,
    forget_ratio,
    mean_accuracy,
    mean_std,
    run_metrics,
)


def test_forget_ratio_hand_computed():
    assert forget_ratio(0.8, 0.6) == pytest.approx(0.25)  # (0.8 - 0.6) / 0.8
    assert forget_ratio(0.5, 0.0) == pytest.approx(1.0)  # everything forgotten
    assert forget_ratio(0.5, 0.5) == 0.0
    assert forget_ratio(0.5, 0.7) == 0.0  # OOD improved: clipped at 0, never negative


def test_forget_ratio_undefined_and_bad_input():
    with pytest.raises(ValueError, match="undefined"):
        forget_ratio(0.0, 0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        forget_ratio(1.2, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        forget_ratio(0.5, float("nan"))
    with pytest.raises(TypeError):
        forget_ratio("high", 0.5)


def test_collapse_rate_hand_computed():
    assert collapse_rate([0.9, 0.0, 0.005, 0.3]) == pytest.approx(0.5)  # 0.0 and 0.005 collapsed
    assert collapse_rate({"copy": 0.02, "sort": 0.5}) == 0.0
    assert collapse_rate({"copy": 0.02, "sort": 0.5}, threshold=0.05) == pytest.approx(0.5)
    assert collapse_rate([0.0]) == 1.0
    with pytest.raises(ValueError, match="empty"):
        collapse_rate([])


def test_mean_accuracy_and_mean_std():
    assert mean_accuracy({"a": 0.2, "b": 0.4}) == pytest.approx(0.3)
    mean, std = mean_std([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert std == pytest.approx(0.1)  # sample std: sqrt((0.01 + 0 + 0.01) / 2)
    assert mean_std([0.7]) == (0.7, 0.0)


def test_run_metrics_hand_computed():
    vanilla = {"new": 0.0, "copy": 1.0, "reverse": 0.8, "sort": 0.6}
    tuned = {"new": 0.9, "copy": 0.9, "reverse": 0.0, "sort": 0.3}
    m = run_metrics(tuned, vanilla, id_task="new")
    assert m.id_accuracy == pytest.approx(0.9)
    assert m.ood_accuracy == pytest.approx(0.4)  # (0.9 + 0 + 0.3) / 3
    assert m.vanilla_ood_accuracy == pytest.approx(0.8)  # (1 + 0.8 + 0.6) / 3
    assert m.forget_ratio == pytest.approx(0.5)  # (0.8 - 0.4) / 0.8
    assert m.collapse_rate == pytest.approx(1 / 3)  # reverse collapsed
    assert set(m.as_dict()) == {"id_accuracy", "ood_accuracy", "vanilla_ood_accuracy",
                                "forget_ratio", "collapse_rate"}
    with pytest.raises(ValueError, match="id_task"):
        run_metrics(tuned, vanilla, id_task="missing")
    with pytest.raises(ValueError, match="missing OOD"):
        run_metrics(tuned, {"copy": 1.0}, id_task="new")
    assert not math.isnan(m.forget_ratio)
