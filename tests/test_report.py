from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from lightning_fairprune.report import (
    HISTORY_FILENAME,
    find_histories,
    format_table,
    load_runs,
    main,
    pareto_best,
    read_history,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_record(moment, rnd, sparsity, accuracy, recall, alpha=None, grad=None, trace=None):
    recall = list(recall)
    present = [r for r in recall if r is not None]
    record = {
        "moment": moment,
        "round": rnd,
        "epoch": rnd,
        "global_step": 10 * rnd,
        "sparsity": sparsity,
        "accuracy": accuracy,
        "num_groups": len(recall),
        "support": [20 + 5 * g for g in range(len(recall))],
        "recall": recall,
        "alpha": alpha,
        "grad_norm": grad,
        "hessian_trace": trace,
        "disparity": {"recall": {"gap": max(present) - min(present)}},
    }
    if grad is not None:
        record["disparity"]["grad_norm"] = {"gap": max(grad) - min(grad)}
    return record


def write_run(root: Path, name: str, finals: tuple[float, float, float], extra_lines=()) -> Path:
    """A run going dense -> 2 rounds; its final record has (sparsity, accuracy, worst recall)."""
    sparsity, accuracy, worst = finals
    run_dir = root / name / "lightning_logs" / "version_0"
    run_dir.mkdir(parents=True)
    records = [
        make_record(
            "dense", 0, 0.0, 0.95, [0.97, 0.93, 0.9], grad=[0.1, 0.2, 0.3], trace=[1, 2, 3]
        ),
        make_record(
            "after_round",
            1,
            sparsity / 2,
            0.9,
            [0.95, 0.9, 0.85],
            alpha=1.2,
            grad=[0.2, 0.3, 0.5],
            trace=[2, 3, 5],
        ),
        make_record(
            "end",
            2,
            sparsity,
            accuracy,
            [0.99, worst, worst + 0.05],
            alpha=1.5,
            grad=[0.3, 0.4, 0.9],
            trace=[3, 4, 9],
        ),
    ]
    lines = [json.dumps(r) for r in records]
    for index, text in extra_lines:
        lines.insert(index, text)
    path = run_dir / HISTORY_FILENAME
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_history_skips_corrupted_lines_and_names_them(tmp_path):
    good = [
        make_record("dense", 0, 0.0, 0.9, [0.9, 0.8]),
        make_record("end", 1, 0.5, 0.8, [0.8, 0.7]),
    ]
    path = tmp_path / HISTORY_FILENAME
    lines = [json.dumps(good[0]), '{"moment": "after_ro', "", "[1, 2]", json.dumps(good[1])]
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="skipped") as caught:
        records = read_history(path)
    assert records == good
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert messages[0].startswith(f"{path}:2: skipped a corrupted line")
    assert messages[1].startswith(f"{path}:4: skipped a line that is not a JSON object")


def test_pareto_best_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(50):
        # few distinct values so that ties happen often
        pts = [tuple(map(float, rng.integers(0, 4, size=2) / 4)) for _ in range(rng.integers(1, 8))]
        expected = []
        for i, p in enumerate(pts):
            dominated = any(
                q[0] >= p[0] and q[1] >= p[1] and q != p for j, q in enumerate(pts) if j != i
            )
            expected.append(not dominated)
        assert pareto_best(pts) == expected
    assert pareto_best([(0.5, None), (0.1, 0.1)]) == [False, True]
    assert pareto_best([(0.5, float("nan")), (0.1, 0.1)]) == [False, True]


def test_write_report_tables_figures_and_pareto(tmp_path):
    finals = {
        "a": (0.5, 0.90, 0.80),  # best accuracy at low sparsity, best worst-recall there too
        "b": (0.9, 0.85, 0.60),  # Pareto-best on accuracy only
        "c": (0.9, 0.80, 0.70),  # Pareto-best on worst-group recall only
        "d": (0.5, 0.88, 0.75),  # dominated by a on both
    }
    dirs = [write_run(tmp_path / "runs", name, f).parents[2] for name, f in finals.items()]
    report = write_report(dirs, tmp_path / "out")
    assert report.errors == []
    rows = {row["run"]: row for row in report.rows}
    assert set(rows) == set(finals)
    assert {n for n, r in rows.items() if r["pareto_accuracy"]} == {"a", "b"}
    assert {n for n, r in rows.items() if r["pareto_wgr"]} == {"a", "c"}
    for name, (sparsity, accuracy, worst) in finals.items():
        row = rows[name]
        assert row["sparsity"] == sparsity
        assert row["accuracy"] == accuracy
        assert row["worst_group_accuracy"] == worst
        assert row["worst_group"] == 1
        assert row["accuracy_gap"] == pytest.approx(0.99 - worst)
        assert row["alpha"] == 1.5
        assert row["dense_accuracy"] == 0.95
        assert row["grad_norm_gap"] == pytest.approx(0.6)
        assert row["hessian_trace_gap"] == pytest.approx(6.0)  # from the per-group list

    out = tmp_path / "out"
    names = {p.name for p in report.figures}
    expected = {"alpha_vs_sparsity.png", "disparity_vs_sparsity.png", "comparison.png"}
    for name in finals:
        expected |= {f"{name}_recall_vs_sparsity.png", f"{name}_overview.png"}
    assert names == expected
    for name in expected:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 5000  # a real plot, not an empty canvas

    text = (out / "report.txt").read_text()
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["run", "records", "rounds", "sparsity"]
    table_rows = {line.split()[0]: line.split() for line in lines[2:6]}
    assert table_rows["b"][3:5] == ["0.9000", "0.8500"]
    assert table_rows["b"][-1] == "acc"
    assert table_rows["c"][-1] == "wgr"
    assert table_rows["a"][-1] == "acc+wgr"
    assert table_rows["d"][-1] == "-"
    md = (out / "report.md").read_text()
    assert "| c | 3 | 2 | 0.9000 | 0.8000 | 0.9500 | 0.7000 | g1 |" in md
    assert "![comparison](comparison.png)" in md


def test_several_histories_in_one_dir_and_file_argument(tmp_path):
    for version in (0, 1):
        d = tmp_path / "exp" / f"version_{version}"
        d.mkdir(parents=True)
        rec = make_record("end", 1, 0.3 + 0.1 * version, 0.9, [0.9, 0.8])
        (d / HISTORY_FILENAME).write_text(json.dumps(rec) + "\n")
    assert len(find_histories(tmp_path / "exp")) == 2
    runs, errors = load_runs([tmp_path / "exp", tmp_path / "exp" / "version_1" / HISTORY_FILENAME])
    assert errors == []
    assert [r.name for r in runs] == ["exp/version_0", "exp/version_1", HISTORY_FILENAME]
    assert [r.final["sparsity"] for r in runs] == [0.3, 0.4, 0.4]


def test_main_exit_codes_and_messages(tmp_path, capsys):
    good = write_run(tmp_path, "good", (0.8, 0.9, 0.7), extra_lines=[(1, "{corrupt")]).parents[2]
    empty = tmp_path / "empty"
    empty.mkdir()
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / HISTORY_FILENAME).write_text("not json\n")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([str(empty), "--out", str(tmp_path / "o1")]) == 2
        err = capsys.readouterr().err
        assert f"{empty}: no {HISTORY_FILENAME} found" in err
        assert not (tmp_path / "o1").exists()

        assert main([str(good), str(empty), str(only_bad), "--out", str(tmp_path / "o2")]) == 1
        captured = capsys.readouterr()
        assert f"{empty}: no {HISTORY_FILENAME} found" in captured.err
        assert "no readable record" in captured.err
        assert captured.out.splitlines()[2].split()[:5] == ["good", "3", "2", "0.8000", "0.9000"]
        assert (tmp_path / "o2" / "comparison.png").read_bytes()[:8] == PNG_MAGIC

        assert main([str(good), "--out", str(tmp_path / "o3")]) == 0
        assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "o4")]) == 2
    assert "no such directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "o5")])
    assert exc.value.code == 2


def test_module_entry_point_warns_with_file_and_line(tmp_path):
    run = write_run(tmp_path, "r", (0.5, 0.9, 0.8), extra_lines=[(2, "{broken")])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_fairprune.report",
            str(tmp_path / "r"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{run}:3: skipped a corrupted line" in proc.stderr
    assert (tmp_path / "out" / "report.txt").exists()


def test_format_table_marks_missing_values():
    row = {"run": "x", "records": 1, "rounds": None, "sparsity": 0.25, "accuracy": None}
    text = format_table([row])
    assert text.splitlines()[2].split() == ["x", "1", "-", "0.2500"] + ["-"] * 10
    assert set(text.splitlines()[1]) == {"-", " "}


# ---------------------------------------------------------------- readable figures (issue 18.15)
NAMES = [
    "colour=White & sex=Male",
    "colour=White & sex=Female",
    "colour=Black & sex=Male",
    "colour=Black & sex=Female",
]


def protected_record(moment, rnd, sparsity, accuracy, group_accuracy, names=NAMES, binary=True):
    """A record of a binary task with named (intersectional) groups, as the monitor writes it."""
    g = len(group_accuracy)
    record = {
        "moment": moment,
        "round": rnd,
        "epoch": rnd,
        "global_step": 10 * rnd,
        "sparsity": sparsity,
        "accuracy": accuracy,
        "num_groups": g,
        "group_names": list(names),
        "groups_are_classes": not binary,
        "support": [400 // (a + 1) for a in range(g)],
        "group_accuracy": list(group_accuracy),
        "group_accuracy_ci": [[a - 0.05, min(1.0, a + 0.05)] for a in group_accuracy],
        "alpha": 1.2 if rnd else None,
        "fairness": {
            "worst_group_accuracy": min(group_accuracy),
            "accuracy_difference": max(group_accuracy) - min(group_accuracy),
            "demographic_parity_difference": 0.1 + 0.2 * sparsity,
            "equalized_odds_difference": 0.15 + 0.3 * sparsity,
        },
    }
    if binary:
        record["tpr"] = [a - 0.05 for a in group_accuracy]
        record["tpr_ci"] = [[a - 0.12, a + 0.02] for a in group_accuracy]
    return record


def write_protected_run(root, name, worst_final=0.45, names=NAMES, binary=True):
    g = len(names)
    base = [0.9 - 0.02 * a for a in range(g)]
    steps = [("dense", 0, 0.0, 0.88, base)]
    for rnd, sparsity in ((1, 0.5), (2, 0.8), (3, 0.9)):
        accs = [v - 0.05 * rnd for v in base]
        steps.append(("after_round", rnd, sparsity, 0.7, [v - 0.1 for v in accs]))
        accs[2] = 0.6 - (0.6 - worst_final) * rnd / 3  # group 2 ends worst
        steps.append(("before_round" if rnd < 3 else "end", rnd, sparsity, 0.85 - 0.02 * rnd, accs))
    run_dir = root / name
    run_dir.mkdir(parents=True)
    lines = [json.dumps(protected_record(*step, names=names, binary=binary)) for step in steps]
    (run_dir / HISTORY_FILENAME).write_text("\n".join(lines) + "\n")
    return run_dir


def saved_figures(monkeypatch):
    """Capture every Figure the report saves (works whatever builds them)."""
    from matplotlib.figure import Figure

    saved = {}
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        saved[Path(fname).name] = self
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def legend_texts(legend):
    return [t.get_text() for t in legend.get_texts()]


def assert_readable(name, fig):
    """Legends outside every axes (never over data), titles inside the figure, not overlapping."""
    fig.draw_without_rendering()  # the layout, without rasterizing
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    axes_boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + fig.legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(a) for a in axes_boxes), f"{name}: a legend covers a panel"
        assert frame.x0 <= box.x0, f"{name}: a legend is cut"
        assert box.x1 <= frame.x1 + 1, f"{name}: a legend is cut"
    titles = [ax.title for ax in fig.axes if ax.get_title()] + [
        t for t in fig.texts if t.get_text()
    ]
    boxes = [t.get_window_extent(renderer) for t in titles]
    for text, box in zip(titles, boxes, strict=True):
        assert frame.x0 <= box.x0, f"{name}: title {text.get_text()!r} cut on the left"
        assert box.x1 <= frame.x1, f"{name}: title {text.get_text()!r} cut on the right"
        assert box.y1 <= frame.y1, f"{name}: title {text.get_text()!r} cut at the top"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), f"{name}: two titles overlap"


def test_report_figures_are_readable_and_name_the_groups(tmp_path, monkeypatch):
    saved = saved_figures(monkeypatch)
    runs = [
        write_protected_run(tmp_path, "arrests_a"),
        write_protected_run(tmp_path, "arrests_b", 0.5),
    ]
    report = write_report(runs, tmp_path / "out")
    expected = {
        "alpha_vs_sparsity.png",
        "disparity_vs_sparsity.png",
        "comparison.png",
        "parity_vs_sparsity.png",
    }
    for run in ("arrests_a", "arrests_b"):
        expected |= {f"{run}_recall_vs_sparsity.png", f"{run}_overview.png", f"{run}_fairness.png"}
    assert set(saved) == expected
    assert {p.name for p in report.figures} == expected
    for name, fig in saved.items():
        assert_readable(name, fig)
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC

    # the per-group panels name the groups, with their sizes, and mark the worst one
    overview = saved["arrests_a_overview.png"]
    labels = legend_texts(overview.axes[0].get_legend())
    assert labels == [
        "colour=White & sex=Male (n=400)",
        "colour=White & sex=Female (n=200)",
        "colour=Black & sex=Male (n=133) - worst",
        "colour=Black & sex=Female (n=100)",
    ]
    accuracy_panel = legend_texts(overview.axes[1].get_legend())
    assert "worst-group accuracy (final worst: colour=Black & sex=Male)" in accuracy_panel
    # per-group TPR and the parity gaps
    fairness = saved["arrests_a_fairness.png"]
    tpr_axes, gap_axes = fairness.axes[:2]
    assert tpr_axes.get_ylabel().startswith("TPR")
    assert [t.split(" (n=")[0] for t in legend_texts(tpr_axes.get_legend())] == NAMES
    assert legend_texts(gap_axes.get_legend()) == [
        "demographic parity difference",
        "equalized odds difference",
        "accuracy difference",
    ]
    x, y = gap_axes.get_lines()[0].get_data()
    assert list(x) == [0.0, 0.5, 0.8, 0.9]  # the latest record at each level (after_round too)
    assert list(y) == pytest.approx([0.1 + 0.2 * s for s in x])
    parity = saved["parity_vs_sparsity.png"]
    assert [ax.get_title() for ax in parity.axes] == [
        "Demographic parity difference vs sparsity",
        "Equalized odds difference vs sparsity",
    ]
    assert legend_texts(parity.legends[0]) == ["arrests_a", "arrests_b"]
    # the group-accuracy disparity of records without "recall" (protected groups) is drawn
    lines = saved["disparity_vs_sparsity.png"].axes[0].get_lines()
    assert len(lines) == 2
    records = [json.loads(x) for x in (runs[0] / HISTORY_FILENAME).read_text().splitlines()]
    latest = {r["sparsity"]: r["group_accuracy"] for r in records}
    assert list(lines[0].get_ydata()) == pytest.approx([max(v) - min(v) for v in latest.values()])
    # the table names the worst group
    rows = {row["run"]: row for row in report.rows}
    assert rows["arrests_a"]["worst_group_name"] == "colour=Black & sex=Male"
    assert "colour=Black & sex=Male" in (tmp_path / "out" / "report.txt").read_text()


def test_many_groups_name_the_worst_and_class_groups_draw_no_parity_gaps(tmp_path):
    from lightning_fairprune.figures import MAX_NAMED_GROUPS, report_figures
    from lightning_fairprune.report import summarize_run

    names = [f"digit {d}" for d in range(12)]
    run_dir = write_protected_run(tmp_path, "digits", names=names, binary=False)
    runs, _ = load_runs([run_dir])
    saved = report_figures(runs, [summarize_run(run) for run in runs])
    assert "digits_fairness.png" not in saved  # class groups: parity gaps mean nothing, no TPR
    assert "parity_vs_sparsity.png" not in saved
    assert_readable("digits_recall_vs_sparsity.png", saved["digits_recall_vs_sparsity.png"])
    ax = saved["digits_recall_vs_sparsity.png"].axes[0]
    labels = legend_texts(ax.get_legend())
    assert len(labels) == MAX_NAMED_GROUPS + 1
    assert labels[-1] == f"{12 - MAX_NAMED_GROUPS} other groups"
    assert ax.get_ylabel().startswith("recall")
    # the named ones are the lowest at the final record (group 2, then the last groups)
    final = [0.9 - 0.02 * a - 0.15 for a in range(12)]
    final[2] = 0.45
    worst = sorted(range(12), key=lambda a: final[a])[:MAX_NAMED_GROUPS]
    assert {label.split(" (n=")[0] for label in labels[:-1]} == {names[a] for a in worst}
