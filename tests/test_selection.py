"""Pareto front on hand-made point sets; report plots are real PNGs."""

import numpy as np
import pytest
from PIL import Image

from orchestrator.selection import padded_limits, pareto_front, plot_curves, plot_pareto, point_label

NAN = float("nan")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def dominates(q, p):
    return q[0] >= p[0] and q[1] >= p[1] and q != p


@pytest.mark.parametrize("points, front", [
    ([], []),
    ([(0.3, 0.7)], [0]),
    ([(1, 1), (2, 0.5), (0.5, 2), (0.8, 0.8), (0.5, 0.5)], [0, 1, 2]),
    ([(1, 1), (1, 1), (0.5, 0.5)], [0, 1]),  # identical points: both on the front
    ([(1, 1), (1, 0.5)], [0]),  # equal in one coordinate, worse in the other: dominated
    ([(0.5, 1), (1, 1)], [1]),
    ([(0, 3), (1, 2), (2, 1), (3, 0)], [0, 1, 2, 3]),  # a falling line: all trade-offs
    ([(0, 0), (1, 1), (2, 2)], [2]),  # a rising line: only the top
    ([(NAN, 1), (0.5, 0.5), (1, NAN)], [1]),  # NaN: never on the front
    ([(NAN, 5), (1, 1), (NAN, NAN)], [1]),  # and never dominates
    ([(NAN, NAN)], []),
])
def test_pareto_front(points, front):
    assert pareto_front(points) == front


def test_pareto_front_random_points_against_the_definition():
    rng = np.random.default_rng(0)
    points = [tuple(p) for p in rng.integers(0, 6, size=(60, 2)).astype(float)]  # many ties
    front = set(pareto_front(points))
    for i, p in enumerate(points):
        assert (i in front) == (not any(dominates(q, p) for q in points))


def assert_png(path) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as img:
        assert img.width > 0 and img.height > 0
        return np.asarray(img.convert("RGB")).astype(int)


# matplotlib's tab10: trials, the baseline arm, the front; the registered trial's star
BLUE, GRAY, RED, GOLD = (0x1F, 0x77, 0xB4), (0x7F, 0x7F, 0x7F), (0xD6, 0x27, 0x28), (0xFF, 0xD7, 0x00)


def pixels_of(image: np.ndarray, color) -> int:
    """How many pixels are drawn in `color` (exactly: markers and lines are filled with it)."""
    return int((np.abs(image - np.array(color)).max(axis=-1) <= 2).sum())


def test_plot_pareto_writes_a_png(tmp_path):
    rows = [{"trial_id": "t0", "clip_t": 0.30, "clip_i": 0.70, "alignment": "palp"},
            {"trial_id": "t1", "clip_t": 0.34, "clip_i": 0.60, "alignment": "palp"},
            {"trial_id": "t2", "clip_t": 0.25, "clip_i": 0.55, "alignment": "palp"},
            {"trial_id": "base", "clip_t": 0.28, "clip_i": 0.75, "alignment": "none"},
            {"trial_id": "failed", "clip_t": NAN, "clip_i": NAN, "alignment": "palp"}]
    path = plot_pareto(rows, tmp_path / "pareto.png", "cat / sketch")
    assert path == tmp_path / "pareto.png"
    image = assert_png(path)
    # trials as blue dots, the baseline as a gray square, the front ringed and joined in red
    assert pixels_of(image, BLUE) > 50 and pixels_of(image, RED) > 50
    no_baseline = assert_png(plot_pareto(rows[:3], tmp_path / "trials.png", "cat / sketch"))
    assert pixels_of(image, GRAY) - pixels_of(no_baseline, GRAY) > 100  # the square (text is gray-ish too)
    # one more trial that dominates all: the front is that point alone, so less red than a 3-point front
    top = rows + [{"trial_id": "t3", "clip_t": 0.5, "clip_i": 0.9, "alignment": "palp"}]
    assert pixels_of(assert_png(plot_pareto(top, tmp_path / "top.png", "cat / sketch")), RED) < pixels_of(image, RED)


def test_plot_pareto_reads_the_scorers_metrics(tmp_path):
    rows = [{"trial_id": "t0", "judge_text": 0.9, "judge_subject": 0.4, "alignment": "palp"},
            {"trial_id": "t1", "judge_text": 0.6, "judge_subject": 0.9, "alignment": "none"}]
    assert_png(plot_pareto(rows, tmp_path / "pareto.png", "moon / sketch", "judge_text", "judge_subject"))
    with pytest.raises(KeyError, match="clip"):  # no CLIP keys are read unless asked for
        plot_pareto(rows, tmp_path / "clip.png", "moon / sketch")


def test_plot_pareto_with_no_scored_trial(tmp_path):
    rows = [{"trial_id": "failed", "clip_t": NAN, "clip_i": NAN, "alignment": "none"}]
    image = assert_png(plot_pareto(rows, str(tmp_path / "pareto.png"), "empty"))
    assert pixels_of(image, BLUE) == pixels_of(image, RED) == 0  # nothing plotted


def test_plot_curves_writes_a_png(tmp_path):
    histories = {
        "t0": [{"step": s, "clip_t": 0.2 + 0.01 * s, "clip_i": 0.8 - 0.01 * s, "composite": 0.4} for s in (0, 5, 10)],
        "t1": [{"step": 0, "clip_t": 0.25}, {"step": 5, "clip_t": 0.27, "clip_i": 0.6}],  # a metric missing
        "t2": [],  # failed before its first evaluation
    }
    path = plot_curves(histories, tmp_path / "curves.png", ["clip_t", "clip_i", "composite"])
    image = assert_png(path)
    assert pixels_of(image, BLUE) > 100  # t0's lines (the first color), in each panel
    assert pixels_of(image, (0xFF, 0x7F, 0x0E)) > 20  # t1's (the second)
    assert image.shape[1] > 2.5 * image.shape[0]  # three panels side by side
    empty = assert_png(plot_curves({}, tmp_path / "empty.png", ["composite"]))
    assert pixels_of(empty, BLUE) == 0
    with pytest.raises(ValueError, match="at least one metric"):
        plot_curves(histories, tmp_path / "none.png", [])


def test_plots_star_the_registered_trial(tmp_path):
    rows = [{"trial_id": "s_00000", "clip_t": 0.30, "clip_i": 0.70, "alignment": "palp"},
            {"trial_id": "s_00001", "clip_t": 0.28, "clip_i": 0.75, "alignment": "none"}]
    starred = assert_png(plot_pareto(rows, tmp_path / "starred.png", "cat / sketch", registered="s_00001"))
    plain = assert_png(plot_pareto(rows, tmp_path / "plain.png", "cat / sketch"))
    assert pixels_of(starred, GOLD) > 100 and pixels_of(plain, GOLD) == 0
    histories = {"00000 palp": [{"step": 4, "clip_t": 0.3}, {"step": 8, "clip_t": 0.32}], "00001 baseline": []}
    curves = assert_png(plot_curves(histories, tmp_path / "c.png", ["clip_t"], "cat / sketch", registered="00000 palp"))
    assert pixels_of(curves, GOLD) > 50
    assert pixels_of(assert_png(plot_curves(histories, tmp_path / "c0.png", ["clip_t"])), GOLD) == 0


def test_padded_limits_never_collapse_and_keep_every_point_inside():
    lo, hi = padded_limits([0.3084001, 0.3084012, 0.3084005])  # the "1e-6+3.084e-1" axis of issue 14
    assert hi - lo >= 0.02 and lo < 0.3084001 and hi > 0.3084012
    assert abs((lo + hi) / 2 - 0.30840065) < 1e-6  # centred on the points
    lo, hi = padded_limits([0.2, 0.8])
    assert lo == pytest.approx(0.2 - 0.08 * 0.6) and hi == pytest.approx(0.8 + 0.08 * 0.6)
    assert padded_limits([NAN, 0.5]) == padded_limits([0.5]) and padded_limits([]) == (0.0, 1.0)


def test_point_label_is_the_short_id_and_the_arm():
    assert point_label({"trial_id": "abc_00003", "alignment": "none", "hparams": {"rank": 8}}) == "00003 baseline r8"
    assert point_label({"trial_id": "abc_00003", "alignment": "palp", "label": "palp r4"}) == "00003 palp r4"
