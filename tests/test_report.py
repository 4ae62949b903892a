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
