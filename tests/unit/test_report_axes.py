"""The report's axis rules (opt_study/report/figures.py) and its embedded figures."""

from __future__ import annotations

import base64

import numpy as np
from matplotlib.figure import Figure

from opt_study.report import figures, render


def _ax():
    return Figure().subplots()


def test_symlog_ticks_stay_outside_the_noise_band_and_do_not_crowd():
    ax = _ax()
    gaps = -np.logspace(-9, 2, 50)  # eleven decades of (negative) convexity gaps
    ax.plot(np.arange(50), gaps)
    figures._symlog(ax, [gaps], linthresh=1e-6)
    ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1] or t == 0]
    assert ax.get_yscale() == "symlog" and 0.0 in ticks
    assert all(t == 0 or abs(t) >= 1e-5 for t in ax.get_yticks())  # no label inside the linear band
    assert len(ax.get_yticks()) <= 7
    assert figures._power_label(-1e-3) == "$-10^{-3}$" and figures._power_label(0.0) == "0"


def test_log_axis_only_where_values_span_decades():
    ax = _ax()
    assert figures._log_if_spans(ax, [np.array([550.0, 80.0, 3.0, 1.0])]) and ax.get_yscale() == "log"
    ax = _ax()
    assert not figures._log_if_spans(ax, [np.array([5.0, 1.0])]) and ax.get_yscale() == "linear"
    ax = _ax()
    assert not figures._log_if_spans(ax, [np.array([-1.0, 100.0])])  # signed: never log
    ax = _ax()
    assert figures._log_if_spans(ax, [np.array([1e-3, 3e-3, 1e-2])], axis="x", ratio=3.0)
    assert ax.get_xscale() == "log"


def test_figure_is_embedded_as_a_png_data_uri():
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    tag = render.figure(fig, 'a "figure"')
    assert tag.startswith('<figure><img src="data:image/png;base64,') and 'alt="a &quot;figure&quot;"' in tag
    png = base64.b64decode(tag.split("base64,", 1)[1].split('"', 1)[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert render.table([], [("a", "a")]) == "" and "nothing" in render.table([], [("a", "a")], empty="nothing")
    assert (render.plural(1, "trial"), render.plural(3, "trial")) == ("1 trial", "3 trials")
