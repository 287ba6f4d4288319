"""``lodas diag``: figures of the printed table and of the JSON line against values computed
by hand from rows written here (diagnostics.jsonl, replay records, twin directories)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from coupler.cli import main
from coupler.diag import summarize_rows


def row(cycle: int, *, status: int = 0, n_obs: int = 10, omb_mean: float = 0.1, omb_rms: float = 1.0,
        oma_mean: float | None = 0.05, oma_rms: float | None = 0.5, rmse_b: float | None = 2.0,
        rmse_a: float | None = 1.5, spread: float | None = None, analysis_s: float = 0.25, **extra) -> dict:
    """A row as driver._diagnostics writes it (None is JSON null, as NaN is written)."""
    r = dict(cycle=cycle, step=10 * (cycle + 1), model_time=0.05 * (cycle + 1), status=status, n_obs=n_obs,
             omb_mean=omb_mean, omb_rms=omb_rms, oma_mean=oma_mean, oma_rms=oma_rms, rmse_b=rmse_b,
             rmse_a=rmse_a, spread=spread, wait_s=0.01, analysis_s=analysis_s, scatter_s=0.001,
             host_put_s=None, host_get_s=None)
    r.update(extra)
    return r


def write_jsonl(d: Path, rows: list[dict], tail: str = "") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return d


def write_records(d: Path, rows: list[dict]) -> Path:
    (d / "records").mkdir(parents=True, exist_ok=True)
    for r in rows:
        (d / "records" / f"cycle_{r['cycle']:06d}.json").write_text(json.dumps(r))
    return d


def diag(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["diag", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def table_rows(out: str, label: str) -> list[tuple[int, list[float | None]]]:
    """``[(cycles, [mean, min, max])]`` of the statistics-table lines of ``label``."""
    found = []
    for line in out.splitlines():
        if line.startswith(f"  {label} "):
            fields = line[2 + len(label):].split()
            found.append((int(fields[0]), [None if f == "n/a" else float(f) for f in fields[1:4]]))
    return found


def table_row(out: str, label: str) -> tuple[int, list[float | None]]:
    """``(cycles, [mean, min, max])`` of the one statistics-table line of ``label``."""
    found = table_rows(out, label)
    assert len(found) == 1, (label, out)
    return found[0]


def rms(values) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


def approx5(x):
    """The table prints 5 significant digits."""
    return pytest.approx(x, rel=1e-4)


# -- figures --------------------------------------------------------------------------------
def test_jsonl_table_and_json_figures(tmp_path, capsys):
    omb_rms, oma_rms = [1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 1.0, 1.5, 2.0, 2.5]
    omb_mean, n_obs = [0.1, -0.3, 0.2, 0.4, -0.1], [10, 12, 8, 10, 10]
    rows = [row(c, n_obs=n_obs[c], omb_mean=omb_mean[c], omb_rms=omb_rms[c], oma_rms=oma_rms[c],
                rmse_b=2.0 + c, rmse_a=1.0 + c, spread=0.3 + 0.1 * c) for c in range(5)]
    d = write_jsonl(tmp_path / "run", rows)
    rc, out, err = diag(capsys, d, "--json")
    assert rc == 0 and err == ""
    assert out.startswith(f"lodas diag: {d}\n")
    assert "5 cycles (0-4), from 5 rows of diagnostics.jsonl" in out
    assert "status: ok 5" in out

    n, (mean, lo, hi) = table_row(out, "O-B RMS")
    assert n == 5 and mean == approx5(rms(omb_rms)) and (lo, hi) == (1.0, 5.0)
    assert mean != approx5(sum(omb_rms) / 5)            # RMS over cycles, not the mean of the RMS
    n, (mean, lo, hi) = table_row(out, "O-A RMS")
    assert n == 5 and mean == approx5(rms(oma_rms)) and (lo, hi) == (0.5, 2.5)
    assert table_row(out, "O-B mean") == (5, [approx5(sum(omb_mean) / 5), -0.3, 0.4])
    assert table_row(out, "observations per cycle") == (5, [10.0, 8.0, 12.0])
    assert table_row(out, "ensemble spread")[1][0] == approx5(rms([0.3 + 0.1 * c for c in range(5)]))
    assert table_row(out, "RMSE background") == (5, [4.0, 2.0, 6.0])   # mean of per-cycle RMSE
    assert table_row(out, "RMSE analysis") == (5, [3.0, 1.0, 5.0])
    assert table_row(out, "analysis wall s") == (5, [0.25, 0.25, 0.25])
    assert "sqrt(mean over cycles of the squared per-cycle" in out      # the footer says how

    s = last_json(out)
    assert s["output_dir"] == str(d) and s["cycles"] == 5 and s["used_cycles"] == 5
    assert s["status_counts"] == {"ok": 5} and s["missing_cycles"] == []
    assert s["stats"]["omb_rms"] == {"n": 5, "mean": pytest.approx(rms(omb_rms)), "min": 1.0, "max": 5.0}
    assert s["stats"]["oma_rms"]["mean"] == pytest.approx(rms(oma_rms))
    assert s["stats"]["n_obs"]["mean"] == pytest.approx(10.0)


def test_spinup_leaves_first_cycles_out_of_the_statistics(tmp_path, capsys):
    omb_rms = [10.0, 8.0, 3.0, 4.0, 6.0]
    d = write_jsonl(tmp_path / "run", [row(c, omb_rms=omb_rms[c], rmse_b=omb_rms[c]) for c in range(5)])
    rc, out, _ = diag(capsys, d, "--spinup", "2", "--json")
    assert rc == 0
    assert "5 cycles (0-4)" in out and "statistics over 3 cycles after 2 spin-up cycles" in out
    assert table_row(out, "O-B RMS") == (3, [approx5(rms([3.0, 4.0, 6.0])), 3.0, 6.0])
    assert table_row(out, "RMSE background") == (3, [approx5(13.0 / 3), 3.0, 6.0])
    s = last_json(out)
    assert (s["cycles"], s["spinup_cycles"], s["used_cycles"]) == (5, 2, 3)
    assert s["status_counts"] == {"ok": 5}                  # spin-up cycles are still counted
    assert s["stats"]["omb_rms"]["mean"] == pytest.approx(math.sqrt((9 + 16 + 36) / 3))


def test_spinup_longer_than_the_run(tmp_path, capsys):
    d = write_jsonl(tmp_path / "run", [row(0), row(1)])
    rc, out, _ = diag(capsys, d, "--spinup", "5", "--json")
    assert rc == 0 and "no cycles left after --spinup 2" in out
    s = last_json(out)
    assert s["used_cycles"] == 0 and s["stats"]["omb_rms"]["mean"] is None


def test_failed_cycles_counted_but_left_out_of_oa(tmp_path, capsys):
    rows = [row(0, omb_rms=1.0, oma_rms=0.5), row(1, omb_rms=2.0, oma_rms=1.0),
            # the analysis ran but produced NaN (status 4): its O-A must not count
            row(2, status=4, omb_rms=3.0, oma_rms=99.0, oma_mean=99.0, spread=9.0),
            # the analysis raised (status 3): no O-B/O-A, zero increment
            row(3, status=3, n_obs=0, omb_mean=None, omb_rms=None, oma_mean=None, oma_rms=None,
                rmse_b=3.0, rmse_a=3.0),
            row(4, omb_rms=4.0, oma_rms=2.0)]
    d = write_jsonl(tmp_path / "run", rows)
    rc, out, _ = diag(capsys, d, "--json")
    assert rc == 0
    assert "status: ok 3, analysis_failed 1, bad_increment 1" in out
    assert "2 without analysis (status not ok) left out of O-A and spread" in out
    assert table_row(out, "O-A RMS") == (3, [approx5(rms([0.5, 1.0, 2.0])), 0.5, 2.0])
    assert table_row(out, "O-A mean") == (3, [approx5(0.05), 0.05, 0.05])
    assert table_row(out, "O-B RMS") == (4, [approx5(rms([1.0, 2.0, 3.0, 4.0])), 1.0, 4.0])
    assert table_row(out, "observations per cycle") == (5, [8.0, 0.0, 10.0])
    s = last_json(out)
    assert s["status_counts"] == {"ok": 3, "bad_increment": 1, "analysis_failed": 1}
    assert s["no_analysis_cycles"] == 2 and s["stats"]["oma_rms"]["n"] == 3
    assert s["stats"]["spread"]["n"] == 0                   # only the failed cycle had one
    assert "ensemble spread" not in out


def test_summarize_rows_is_pure_and_documented():
    rows = [row(0, omb_rms=3.0, oma_rms=1.0), row(1, omb_rms=4.0, oma_rms=2.0), row(3, status=1, omb_rms=1.0)]
    s = summarize_rows(rows, spinup=0)
    assert s["stats"]["omb_rms"]["mean"] == pytest.approx(math.sqrt((9 + 16 + 1) / 3))
    assert s["stats"]["oma_rms"]["mean"] == pytest.approx(math.sqrt((1 + 4) / 2))   # cycle 3 has no analysis
    assert s["missing_cycles"] == [2] and s["status_counts"] == {"ok": 2, "no_observations": 1}
    assert summarize_rows.__doc__ and "sqrt(mean(value**2))" in summarize_rows.__doc__
    with pytest.raises(ValueError, match="--spinup -1"):
        summarize_rows(rows, spinup=-1)


# -- sources: jsonl, records, twin directories ----------------------------------------------------
def test_records_win_over_jsonl(tmp_path, capsys):
    d = write_jsonl(tmp_path / "replay", [row(c, omb_rms=1.0) for c in range(4)])
    write_records(d, [row(2, omb_rms=7.0, valid_time="2024-01-01T12:00:00", n_obs_outside=3),
                      row(4, omb_rms=5.0, valid_time="2024-01-02T00:00:00")])
    rc, out, _ = diag(capsys, d, "--json", "--cycles")
    assert rc == 0
    assert "5 cycles (0-4), from 4 rows of diagnostics.jsonl and 2 records in records/" in out
    assert table_row(out, "O-B RMS") == (5, [approx5(rms([1.0, 1.0, 7.0, 1.0, 5.0])), 1.0, 7.0])
    cycle2 = [l for l in out.splitlines() if l.split()[:1] == ["2"]]
    assert len(cycle2) == 1 and "2024-01-01T12:00:00" in cycle2[0] and "7" in cycle2[0].split()
    assert last_json(out)["stats"]["omb_rms"]["max"] == 7.0
    assert table_row(out, "obs outside the domain") == (1, [3.0, 3.0, 3.0])     # replay-only key


def test_killed_replay_has_only_records(tmp_path, capsys):
    d = tmp_path / "replay"
    write_records(d, [row(0, omb_rms=2.0, valid_time="2024-01-01T00:00:00"),
                      row(1, status=5, n_obs=0, omb_mean=None, omb_rms=None, oma_mean=None, oma_rms=None,
                          rmse_b=None, rmse_a=None, valid_time="2024-01-01T06:00:00",
                          message="cycle 1: bg/bg_2024010106.nc: no such file"),
                      row(3, omb_rms=4.0, valid_time="2024-01-01T18:00:00")])
    (d / "records" / ".cycle_000004.json.tmp-123").write_text('{"cycle": 4, "om')   # being written
    rc, out, _ = diag(capsys, d, "--cycles", "--json")
    assert rc == 0
    assert "3 cycles (0-3; 1 missing: 2), from 3 records in records/" in out
    assert "status: ok 2, no_background 1" in out
    line1 = [l for l in out.splitlines() if l.split()[:1] == ["1"]][0]
    assert "2024-01-01T06:00:00" in line1 and "no_background" in line1 and "no such file" in line1
    assert table_row(out, "O-B RMS") == (2, [approx5(rms([2.0, 4.0])), 2.0, 4.0])
    s = last_json(out)
    assert s["missing_cycles"] == [2] and s["cycles"] == 3 and s["last_cycle"] == 3


def test_incomplete_last_jsonl_line_is_skipped_with_a_warning(tmp_path, capsys):
    d = write_jsonl(tmp_path / "run", [row(0), row(1)], tail='{"cycle": 2, "omb_r')
    rc, out, _ = diag(capsys, d)
    assert rc == 0 and "2 cycles (0-1)" in out
    assert "warning:" in out and "last line incomplete" in out


def test_twin_directory_reports_each_run(tmp_path, capsys):
    t = tmp_path / "twin"
    write_jsonl(t / "nature", [row(c, n_obs=0, omb_mean=None, omb_rms=None, oma_mean=None, oma_rms=None,
                                   rmse_b=None, rmse_a=None) for c in range(3)])
    write_jsonl(t / "free", [row(c, n_obs=0, omb_mean=None, omb_rms=None, oma_mean=None, oma_rms=None,
                                 rmse_b=5.0, rmse_a=5.0) for c in range(3)])
    write_jsonl(t / "assim", [row(c, omb_rms=1.0 + c, rmse_b=1.0 + c, rmse_a=0.5 + c) for c in range(3)])
    (t / "obs").mkdir()
    rc, out, _ = diag(capsys, t, "--json", "--spinup", "1")
    assert rc == 0
    titles = [l for l in out.splitlines() if l.startswith("lodas diag: ")]
    assert titles == [f"lodas diag: {name}: {t / name}" for name in ("nature", "free", "assim")]
    assert "no values in any cycle: O-B mean, O-B RMS, O-A mean, O-A RMS" in out
    s = last_json(out)
    assert s["output_dir"] == str(t) and list(s["runs"]) == ["nature", "free", "assim"]
    assert s["runs"]["free"]["stats"]["rmse_b"]["mean"] == 5.0
    assert s["runs"]["assim"]["stats"]["rmse_a"]["mean"] == pytest.approx(2.0)       # cycles 1, 2
    assert s["runs"]["assim"]["stats"]["omb_rms"]["mean"] == pytest.approx(rms([2.0, 3.0]))


def test_metadata_from_effective_nml_and_summary(tmp_path, capsys):
    d = write_jsonl(tmp_path / "run", [row(c, rmse_b_per_variable=[1.0 + c, 2.0, 30.0],
                                           rmse_a_per_variable=[0.5, 1.0, 20.0 + c]) for c in range(2)])
    (d / "effective.nml").write_text(
        "&coupler_nml\n    experiment = 'exp_a'\n    start_time = '2000-01-01T00:00:00'\n/\n"
        "&grid_nml\n    variables = 'u', 'v', 'h'\n    time_unit_s = 432000.0\n/\n"
        "&assim_nml\n    method = '3dvar'\n/\n")
    (d / "summary.json").write_text(json.dumps({"cycles": 2, "method": "3dvar", "host": "sw"}))
    rc, out, _ = diag(capsys, d, "--cycles", "--json")
    assert rc == 0
    assert "  experiment exp_a, method 3dvar, host sw" in out
    assert "valid time" in out and "2000-01-01T06:00:00" in out     # model time 0.05 * 5 days
    # per-variable lines under 'RMSE background' then under 'RMSE analysis'
    assert [f for _, f in table_rows(out, "  u")] == [[1.5, 1.0, 2.0], [0.5, 0.5, 0.5]]
    assert [f for _, f in table_rows(out, "  h")] == [[30.0, 30.0, 30.0], [20.5, 20.0, 21.0]]
    s = last_json(out)
    assert (s["experiment"], s["method"]) == ("exp_a", "3dvar")
    assert s["stats"]["rmse_b_per_variable"]["u"]["mean"] == pytest.approx(1.5)


def test_cycles_table_marks_spinup(tmp_path, capsys):
    d = write_jsonl(tmp_path / "run", [row(c, omb_rms=1.0 + c) for c in range(3)])
    rc, out, _ = diag(capsys, d, "--cycles", "--spinup", "1")
    lines = out.splitlines()
    head = [k for k, l in enumerate(lines) if l.split()[:3] == ["cycle", "model", "time"]]
    assert rc == 0 and len(head) == 1
    body = lines[head[0] + 1: head[0] + 4]
    assert body[0].startswith(" *") and not body[1].startswith(" *")
    assert body[1].split()[:5] == ["1", "0.1", "ok", "10", "2"]
    assert "* spin-up cycle: left out of the statistics" in out


# -- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("setup, expected", [
    (lambda p: None, "no such directory"),
    (lambda p: p.mkdir(), "no diagnostics"),
    (lambda p: write_jsonl(p, []), "found diagnostics.jsonl (no cycles)"),
    (lambda p: p.write_text("not a directory"), "not a directory"),
], ids=["missing", "empty-dir", "empty-jsonl", "file"])
def test_errors_name_the_path_and_what_was_expected(tmp_path, capsys, setup, expected):
    path = tmp_path / "out"
    setup(path)
    rc, out, err = diag(capsys, path)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"lodas: error: {path}: ")
    assert expected in err and "diagnostics.jsonl or records/cycle_NNNNNN.json" in err
    assert "Traceback" not in err


def test_negative_spinup_is_a_usage_error(tmp_path, capsys):
    d = write_jsonl(tmp_path / "run", [row(0)])
    rc, _, err = diag(capsys, d, "--spinup", "-1")
    assert rc == 2 and "--spinup -1: expected an integer >= 0" in err
