"""``lodas diag OUTPUT_DIR``: O-B / O-A statistics, spread and RMSE over the cycles of a run.

Rows (one per cycle, the format of :func:`coupler.driver._diagnostics`; NaN written as
``null``) are read from

- ``OUTPUT_DIR/diagnostics.jsonl``: one JSON object per line, appended and flushed as each
  cycle ends (in-line runs; a replay writes it complete at the end), and
- ``OUTPUT_DIR/records/cycle_NNNNNN.json``: one JSON object per completed cycle (a replay;
  a replay killed in the middle has only these).

Rows are deduplicated by ``cycle`` (a record wins over a ``diagnostics.jsonl`` line) and
sorted by cycle. A directory without rows whose subdirectories have some (a twin experiment:
``nature/``, ``free/``, ``assim/``) is reported one subdirectory after the other.

:func:`summarize_rows` is the whole computation (rows -> summary dict, no I/O);
:func:`format_summary` and :func:`format_cycles` only print what it returns.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

from bridges.status import Status

RECORDS_DIR = "records"
JSONL = "diagnostics.jsonl"
EXPECTED = f"{JSONL} or {RECORDS_DIR}/cycle_NNNNNN.json (a lodas run or replay output directory)"
#: Subdirectories of a twin experiment, reported in this order (others follow by name).
TWIN_ORDER = ("nature", "free", "assim")
_RECORD = re.compile(r"^cycle_(\d+)\.json$")

#: (key, label, combine, cycles): ``combine`` 'mean' (arithmetic mean over cycles) or 'rms'
#: (square root of the mean over cycles of the squared per-cycle value); ``cycles`` 'all'
#: (every cycle after spin-up) or 'ok' (only cycles with status ok: those that have an analysis).
QUANTITIES = (
    ("n_obs", "observations per cycle", "mean", "all"),
    ("n_obs_outside", "obs outside the domain", "mean", "all"),
    ("omb_mean", "O-B mean", "mean", "all"),
    ("omb_rms", "O-B RMS", "rms", "all"),
    ("oma_mean", "O-A mean", "mean", "ok"),
    ("oma_rms", "O-A RMS", "rms", "ok"),
    ("spread", "ensemble spread", "rms", "ok"),
    ("rmse_b", "RMSE background", "mean", "all"),
    ("rmse_a", "RMSE analysis", "mean", "all"),
    ("analysis_s", "analysis wall s", "mean", "all"),
)
#: Quantities printed only when at least one cycle has them (the others print n/a).
OPTIONAL = ("n_obs_outside", "spread", "rmse_b", "rmse_a")


# -- the computation (pure) -------------------------------------------------------------------
def _finite(v) -> float | None:
    """``v`` as a float when it is a finite number, else None (null, NaN, strings, booleans)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def status_label(status) -> str:
    """The :class:`bridges.status.Status` label of a row's status (``status_<n>`` if unknown)."""
    try:
        return Status(int(status)).label
    except (TypeError, ValueError):
        return "missing" if status is None else f"status_{status}"


def _is_ok(row: dict) -> bool:
    return row.get("status") == int(Status.OK)


def _stats(values: list[float], combine: str) -> dict:
    """``{n, mean, min, max}`` of per-cycle values; ``mean`` is the RMS combination for 'rms'."""
    if not values:
        return {"n": 0, "mean": None, "min": None, "max": None}
    if combine == "rms":
        centre = math.sqrt(sum(v * v for v in values) / len(values))
    else:
        centre = sum(values) / len(values)
    return {"n": len(values), "mean": centre, "min": min(values), "max": max(values)}


def _per_variable(rows: list[dict], key: str, variables: list[str] | None) -> dict | None:
    """Per-variable ``{name: stats}`` of the list-valued ``key`` (mean over cycles), or None."""
    lists = [r[key] for r in rows if isinstance(r.get(key), list) and r[key]]
    if not lists:
        return None
    nvar = max(len(v) for v in lists)
    names = list(variables) if variables and len(variables) == nvar else [str(k) for k in range(nvar)]
    out = {}
    for k, name in enumerate(names):
        vals = [x for x in (_finite(v[k]) if k < len(v) else None for v in lists) if x is not None]
        out[name] = _stats(vals, "mean")
    return out


def summarize_rows(rows: list[dict], spinup: int = 0, variables: list[str] | None = None) -> dict:
    """Summary figures of a run's per-cycle rows (no I/O).

    Args:
        rows: one dict per cycle, sorted by ``cycle`` (the format of ``diagnostics.jsonl``).
        spinup: the first ``spinup`` rows (in cycle order) are counted but left out of the
            statistics.
        variables: state variable names, for the ``*_per_variable`` lists.

    Returns:
        ``cycles`` (all rows), ``first_cycle``, ``last_cycle``, ``missing_cycles`` (indices
        between the first and last with no row), ``status_counts`` (label -> count over all
        rows), ``spinup_cycles``, ``used_cycles`` (rows after spin-up), ``no_analysis_cycles``
        (used rows with a non-zero status: left out of O-A and spread), and ``stats``: for
        each quantity of :data:`QUANTITIES` ``{n, mean, min, max}`` over the used cycles with
        a finite value; ``mean`` is the arithmetic mean, except for the RMS quantities
        (``omb_rms``, ``oma_rms``, ``spread``) where it is ``sqrt(mean(value**2))``. RMSE
        against the truth is the mean over cycles of the per-cycle RMSE, as in
        ``summary.json``; for a cycle without analysis it is that of the background it kept.
        ``rmse_b_per_variable`` / ``rmse_a_per_variable`` are added when the rows have them.
    """
    if spinup < 0:
        raise ValueError(f"--spinup {spinup}: expected an integer >= 0")
    cycles = [r["cycle"] for r in rows]
    present = set(cycles)
    missing = [c for c in range(min(cycles), max(cycles) + 1) if c not in present] if cycles else []
    used = rows[spinup:]
    ok = [r for r in used if _is_ok(r)]
    stats = {}
    for key, _, combine, which in QUANTITIES:
        vals = [v for v in (_finite(r.get(key)) for r in (ok if which == "ok" else used)) if v is not None]
        stats[key] = _stats(vals, combine)
    for key in ("rmse_b_per_variable", "rmse_a_per_variable"):
        per = _per_variable(used, key, variables)
        if per is not None:
            stats[key] = per
    return {
        "cycles": len(rows),
        "first_cycle": cycles[0] if cycles else None,
        "last_cycle": cycles[-1] if cycles else None,
        "missing_cycles": missing,
        "status_counts": dict(Counter(status_label(r.get("status")) for r in rows)),
        "spinup_cycles": min(spinup, len(rows)),
        "used_cycles": len(used),
        "no_analysis_cycles": len(used) - len(ok),
        "stats": stats,
    }


# -- reading ----------------------------------------------------------------------------------
def _row_or_none(obj) -> dict | None:
    """A row when ``obj`` is a JSON object with an integer ``cycle``."""
    if isinstance(obj, dict) and isinstance(obj.get("cycle"), int) and not isinstance(obj["cycle"], bool):
        return obj
    return None


def _read_jsonl(path: Path, warnings: list[str]) -> list[dict]:
    """Rows of ``diagnostics.jsonl``; unreadable lines are skipped with a warning."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read ({exc}); expected one JSON object per line") from None
    rows, lines = [], text.split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = _row_or_none(json.loads(line))
        except json.JSONDecodeError:
            row = None
        if row is not None:
            rows.append(row)
        elif n == len(lines):    # no newline after it: written when the run was killed
            warnings.append(f"{path}: last line incomplete (run killed while writing it?): skipped")
        else:
            warnings.append(f"{path}: line {n} is not a JSON object with an integer 'cycle': skipped")
    return rows


def _read_records(records: Path, warnings: list[str]) -> list[dict]:
    """Rows of ``records/cycle_NNNNNN.json`` (temporary ``.cycle_*`` files are ignored)."""
    rows = []
    for p in sorted(records.iterdir()):
        m = _RECORD.match(p.name)
        if not m or not p.is_file():
            continue
        try:
            obj = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            warnings.append(f"{p}: unreadable ({type(exc).__name__}): skipped")
            continue
        if isinstance(obj, dict) and "cycle" not in obj:
            obj["cycle"] = int(m.group(1))
        row = _row_or_none(obj)
        if row is None:
            warnings.append(f"{p}: not a JSON object with an integer 'cycle': skipped")
            continue
        rows.append(row)
    return rows


def read_rows(run_dir: str | Path) -> tuple[list[dict], dict]:
    """The rows of one output directory, deduplicated by cycle (records win), sorted by cycle.

    Returns:
        ``(rows, info)`` with ``info`` = ``{"jsonl": n lines read or None when there is no
        file, "records": n records read or None, "warnings": [...]}``.
    """
    run_dir = Path(run_dir)
    warnings: list[str] = []
    by_cycle: dict[int, dict] = {}
    info: dict = {"jsonl": None, "records": None, "warnings": warnings}
    jsonl = run_dir / JSONL
    if jsonl.is_file():
        rows = _read_jsonl(jsonl, warnings)
        info["jsonl"] = len(rows)
        by_cycle.update((r["cycle"], r) for r in rows)
    records = run_dir / RECORDS_DIR
    if records.is_dir():
        try:
            rows = _read_records(records, warnings)
        except OSError as exc:
            raise ValueError(f"{records}: cannot be read ({exc}); expected cycle_NNNNNN.json files") from None
        info["records"] = len(rows)
        by_cycle.update((r["cycle"], r) for r in rows)
    return [by_cycle[c] for c in sorted(by_cycle)], info


def run_metadata(run_dir: str | Path) -> dict:
    """Method, experiment and state variables of a run, from ``summary.json`` and
    ``effective.nml`` (or ``launch.nml``) when present; missing or unreadable files give
    nothing (a warning), never an error."""
    run_dir = Path(run_dir)
    meta: dict = {"warnings": []}
    path = run_dir / "summary.json"
    if path.is_file():
        try:
            s = json.loads(path.read_text())
            for key in ("method", "experiment", "host"):
                if isinstance(s.get(key), str) and s[key]:
                    meta[key] = s[key]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            meta["warnings"].append(f"{path}: unreadable ({type(exc).__name__}): ignored")
    for name in ("effective.nml", "launch.nml"):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            import f90nml

            nml = f90nml.read(path)
        except Exception as exc:  # noqa: BLE001 - f90nml raises a variety of parser errors
            meta["warnings"].append(f"{path}: unreadable ({type(exc).__name__}: {exc}): ignored")
            continue
        for group, key in (("coupler_nml", "experiment"), ("assim_nml", "method")):
            value = nml.get(group, {}).get(key)
            if isinstance(value, str) and value and key not in meta:
                meta[key] = value
        start, unit = nml.get("coupler_nml", {}).get("start_time"), nml.get("grid_nml", {}).get("time_unit_s")
        if isinstance(start, str) and _finite(unit) is not None:
            try:
                meta["start_time"], meta["time_unit_s"] = datetime.fromisoformat(start), float(unit)
            except ValueError:
                pass
        variables = nml.get("grid_nml", {}).get("variables")
        if variables and "variables" not in meta:
            meta["variables"] = [variables] if isinstance(variables, str) else [str(v) for v in variables]
        break
    return meta


def find_runs(output_dir: str | Path) -> list[tuple[str | None, Path, list[dict], dict]]:
    """``[(label, run_dir, rows, info)]``: the directory itself when it has rows, else each
    subdirectory that has some (twin experiment order first), with label the subdirectory name.

    Raises:
        FileNotFoundError: no such directory.
        ValueError: not a directory, unreadable, or no rows in it nor in its subdirectories.
    """
    out = Path(output_dir)
    if not out.exists():
        raise FileNotFoundError(f"{out}: no such directory; expected an output directory with {EXPECTED}")
    if not out.is_dir():
        raise ValueError(f"{out}: not a directory; expected an output directory with {EXPECTED}")
    rows, info = read_rows(out)
    if rows:
        return [(None, out, rows, info)]
    try:
        subdirs = [p for p in out.iterdir() if p.is_dir() and p.name != RECORDS_DIR]
    except OSError as exc:
        raise ValueError(f"{out}: cannot be read ({exc}); expected an output directory with {EXPECTED}") from None
    subdirs.sort(key=lambda p: (TWIN_ORDER.index(p.name) if p.name in TWIN_ORDER else len(TWIN_ORDER), p.name))
    runs = []
    for sub in subdirs:
        sub_rows, sub_info = read_rows(sub)
        if sub_rows:
            runs.append((sub.name, sub, sub_rows, sub_info))
    if runs:
        return runs
    found = [f"{p.relative_to(out)} (no cycles)" for p in (out / JSONL, out / RECORDS_DIR) if p.exists()]
    detail = f"found {', '.join(found)}" if found else "found neither"
    raise ValueError(f"{out}: no diagnostics: expected {EXPECTED}, in it or in its subdirectories "
                     f"(twin experiment: nature/, free/, assim/); {detail}")


# -- printing ---------------------------------------------------------------------------------
def _fmt(v, width: int = 11) -> str:
    if v is None:
        return f"{'n/a':>{width}}"
    if isinstance(v, int):
        return f"{v:>{width}d}"
    return f"{v:>{width}.5g}"


def _cycle_range(s: dict) -> str:
    if not s["cycles"]:
        return "no cycles"
    text = f"{s['cycles']} cycles ({s['first_cycle']}-{s['last_cycle']}"
    miss = s["missing_cycles"]
    if miss:
        shown = ", ".join(map(str, miss[:10])) + (", ..." if len(miss) > 10 else "")
        text += f"; {len(miss)} missing: {shown}"
    return text + ")"


def format_summary(summary: dict, *, title: str, meta: dict | None = None, info: dict | None = None,
                   cycles_table: str | None = None) -> str:
    """Header, optional per-cycle table, statistics table and footer of one run."""
    meta, info = meta or {}, info or {}
    s, st = summary, summary["stats"]
    lines = [f"lodas diag: {title}"]
    what = [f"{k} {meta[k]}" for k in ("experiment", "method", "host") if meta.get(k)]
    if what:
        lines.append("  " + ", ".join(what))
    sources = [f"{info['jsonl']} rows of {JSONL}" if info.get("jsonl") is not None else None,
               f"{info['records']} records in {RECORDS_DIR}/" if info.get("records") is not None else None]
    lines.append(f"  {_cycle_range(s)}, from {' and '.join(x for x in sources if x)}")
    lines.append("  status: " + ", ".join(f"{k} {v}" for k, v in sorted(
        s["status_counts"].items(), key=lambda kv: (kv[0] != "ok", kv[0]))))
    used = f"  statistics over {s['used_cycles']} cycles"
    if s["spinup_cycles"]:
        used += f" after {s['spinup_cycles']} spin-up cycles"
    if s["no_analysis_cycles"]:
        used += f"; {s['no_analysis_cycles']} without analysis (status not ok) left out of O-A and spread"
    lines.append(used)
    for w in list(meta.get("warnings", [])) + list(info.get("warnings", [])):
        lines.append(f"  warning: {w}")
    if cycles_table:
        lines += ["", cycles_table]
    if not s["used_cycles"]:
        lines.append(f"  no cycles left after --spinup {s['spinup_cycles']}: nothing to average")
        return "\n".join(lines)
    lines += ["", f"  {'quantity':<26}{'cycles':>7}{'mean':>11}{'min':>11}{'max':>11}"]
    empty = []
    for key, label, _, _ in QUANTITIES:
        q = st[key]
        if q["n"] == 0:
            if key not in OPTIONAL:
                empty.append(label)
            continue
        lines.append(f"  {label:<26}{q['n']:>7d}{_fmt(q['mean'])}{_fmt(q['min'])}{_fmt(q['max'])}")
        per = st.get(f"{key}_per_variable")
        if per and len(per) > 1:
            for name, pq in per.items():
                lines.append(f"    {name:<24}{pq['n']:>7d}{_fmt(pq['mean'])}{_fmt(pq['min'])}{_fmt(pq['max'])}")
    if empty:
        lines.append(f"  no values in any cycle: {', '.join(empty)}")
    lines += ["",
              "  mean of the RMS rows (O-B RMS, O-A RMS, spread): sqrt(mean over cycles of the squared per-cycle",
              "  value), each cycle weighing the same; other rows: arithmetic mean over cycles (RMSE against the",
              "  truth as in summary.json). min/max: of the per-cycle values. O-A and spread: only cycles with",
              "  status ok."]
    return "\n".join(lines)


def _valid_time(row: dict, meta: dict) -> str:
    """The row's ``valid_time``, else its model time as a valid time when the namelist gives
    ``start_time`` and ``time_unit_s``, else the model time itself."""
    when = row.get("valid_time")
    if isinstance(when, str) and when:
        return when
    mt = _finite(row.get("model_time"))
    if mt is None:
        return "n/a"
    start, unit = meta.get("start_time"), meta.get("time_unit_s")
    if start is not None and unit is not None:
        try:
            return (start + timedelta(seconds=mt * unit)).isoformat()
        except OverflowError:
            pass
    return f"{mt:.6g}"


def format_cycles(rows: list[dict], spinup: int = 0, meta: dict | None = None) -> str:
    """One line per cycle: cycle, valid time (or model time), status, n_obs, O-B and O-A RMS,
    spread, RMSE of background and analysis, analysis seconds, and the row's message if any."""
    meta = meta or {}
    valid = meta.get("start_time") or any(isinstance(r.get("valid_time"), str) for r in rows)
    head = (f"  {'cycle':>7} {'valid time' if valid else 'model time':<20}{'status':<16}{'n_obs':>7}"
            f"{'O-B rms':>11}{'O-A rms':>11}{'spread':>11}{'rmse_b':>11}{'rmse_a':>11}{'analysis_s':>11}")
    lines = [head]
    for k, r in enumerate(rows):
        when = _valid_time(r, meta)
        n_obs = _finite(r.get("n_obs"))
        n_obs = int(n_obs) if n_obs is not None and n_obs.is_integer() else n_obs
        mark = "*" if k < spinup else " "
        line = (f" {mark}{r['cycle']:>7} {when:<20}{status_label(r.get('status')):<16}{_fmt(n_obs, 7)}"
                + "".join(_fmt(_finite(r.get(key))) for key in
                          ("omb_rms", "oma_rms", "spread", "rmse_b", "rmse_a", "analysis_s")))
        if isinstance(r.get("message"), str) and r["message"]:
            line += f"  {r['message']}"
        lines.append(line.rstrip())
    if spinup and rows:
        lines.append("  * spin-up cycle: left out of the statistics")
    return "\n".join(lines)


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def diagnose(output_dir: str | Path, spinup: int = 0) -> list[dict]:
    """Summaries of every run found in ``output_dir`` (see :func:`find_runs`), each with
    ``label``, ``output_dir``, ``experiment``, ``method``, the :func:`summarize_rows` figures,
    and (private, for printing) ``_rows``, ``_meta``, ``_info``."""
    if spinup < 0:
        raise ValueError(f"--spinup {spinup}: expected an integer >= 0")
    results = []
    for label, run_dir, rows, info in find_runs(output_dir):
        meta = run_metadata(run_dir)
        summary = summarize_rows(rows, spinup, meta.get("variables"))
        results.append({"label": label, "output_dir": str(run_dir), "experiment": meta.get("experiment"),
                        "method": meta.get("method"), **summary, "_rows": rows, "_meta": meta, "_info": info})
    return results


def main_diag(args) -> int:
    """``lodas diag OUTPUT_DIR [--cycles] [--spinup N] [--json]``: print the tables; 0."""
    results = diagnose(args.output_dir, args.spinup)
    blocks = []
    for r in results:
        title = r["output_dir"] if r["label"] is None else f"{r['label']}: {r['output_dir']}"
        table = format_cycles(r["_rows"], args.spinup, r["_meta"]) if args.cycles else None
        blocks.append(format_summary(r, title=title, meta=r["_meta"], info=r["_info"], cycles_table=table))
    try:
        print("\n\n".join(blocks))
        if args.json:
            print(json.dumps(_json_safe(summary_object(args.output_dir, results))))
        sys.stdout.flush()
    except BrokenPipeError:     # `lodas diag DIR --cycles | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def summary_object(output_dir: str | Path, results: list[dict]) -> dict:
    """The ``--json`` object: one run's figures, or ``{output_dir, runs: {label: figures}}``
    for a directory of runs (twin experiment)."""
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    if len(public) == 1 and public[0]["label"] is None:
        return {k: v for k, v in public[0].items() if k != "label"}
    return {"output_dir": str(Path(output_dir)), "runs": {p.pop("label"): p for p in public}}
