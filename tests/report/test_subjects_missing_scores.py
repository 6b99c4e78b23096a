"""The per-subject section when a confirmed point has no score for a metric."""

from __future__ import annotations

import math

import pandas as pd

from harness.report.subjects import per_subject, weak_subjects


def per_image(point_3_dino: float) -> pd.DataFrame:
    """Two subjects, the base model (point -1) and points 3 and 7, two images each."""
    rows = []
    for subject, base, seven in (("cat", 0.4, 0.6), ("dog", 0.5, 0.3)):
        for _ in range(2):
            rows.append({"subject": subject, "point": -1, "dino": base})
            rows.append({"subject": subject, "point": 7, "dino": seven})
            rows.append({"subject": subject, "point": 3, "dino": point_3_dino})
    return pd.DataFrame(rows)


def test_point_with_no_scores_on_any_subject_is_skipped() -> None:
    table = per_subject(per_image(math.nan), "dino", [7, 3])
    assert table["point 3"].isna().all()
    weak = weak_subjects(table, [7, 3], {7: "base", 3: "base"})
    assert weak == ["point 7: weakest on `dog` (0.300); no better than the base model on `dog`."]


def test_a_subject_without_a_score_is_left_out() -> None:
    table = pd.DataFrame(
        {"subject": ["cat", "dog"], "base": [0.4, 0.5], "point 3": [math.nan, 0.6]}
    )
    weak = weak_subjects(table, [3], {3: "base"})
    assert weak == [
        "point 3: weakest on `dog` (0.600); better than the base model on every subject."
    ]
