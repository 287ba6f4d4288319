"""One namelist for both sides: typed groups, clear errors, overrides, effective namelist."""
from __future__ import annotations

import re
from pathlib import Path

import f90nml
import pytest

from bridges.namelist import GROUPS, NamelistError, load, parse_override
from tests.conftest import REPO, lodas

BASE = """
&model_own_nml   ! a group lodas does not know: carried along, ignored
    anything = 1, whatever = 'x'
/
&grid_nml
    nx = 40
    ny = 1
    variables = 'x'
/
&assim_nml
    method = '3dvar'
/
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "test.nml"
    p.write_text(text)
    return p


def test_defaults_and_unknown_groups_are_ignored(tmp_path):
    cfg = load(write(tmp_path, BASE))
    assert cfg.grid.nx == 40 and cfg.grid.variables == ["x"]
    assert cfg.assim.method == "3dvar" and cfg.coupler.output_dir == "lodas_output"
    assert "model_own_nml" in cfg.to_namelist()          # carried into the effective namelist


@pytest.mark.parametrize("extra, expected", [
    ("&assim_nml\n methd = 'none'\n/", r"&assim_nml: unknown key 'methd' \(did you mean 'method'\?\)"),
    ("&obs_nml\n every_k = 1.5\n/", r"&obs_nml every_k = 1.5: expected an integer"),
    ("&obs_nml\n fraction = 2.0\n/", r"&obs_nml fraction = 2.0: expected a value <= 1"),
    ("&bridge_nml\n increment_mode = 'iua'\n/", r"increment_mode = 'iua': expected one of 'direct', 'iau' \(did you mean 'iau'\?\)"),
    ("&coupler_nml\n write_increments = 3\n/", r"write_increments = 3: expected a logical"),
    ("&obs_nml\n variables = 'y'\n/", r"&obs_nml variables: 'y' is not a grid variable"),
])
def test_errors_name_file_group_key_value_and_expectation(tmp_path, extra, expected):
    text = BASE.replace("&assim_nml\n    method = '3dvar'\n/\n", "") + extra
    path = write(tmp_path, text)
    with pytest.raises(NamelistError, match=expected) as info:
        load(path)
    assert str(path) in str(info.value)


def test_missing_required_group_and_key(tmp_path):
    with pytest.raises(NamelistError, match=r"required group &grid_nml is missing"):
        load(write(tmp_path, "&assim_nml\n method='none'\n/\n"))
    with pytest.raises(NamelistError, match=r"&grid_nml: required key 'variables' is missing"):
        load(write(tmp_path, "&grid_nml\n nx=4, ny=1\n/\n"))


def test_overrides_apply_on_top_of_the_file(tmp_path):
    cfg = load(write(tmp_path, BASE), ["assim_nml.method=none", "coupler_nml.seed=7", "obs_nml.error_std=0.5"])
    assert (cfg.assim.method, cfg.coupler.seed, cfg.obs.error_std) == ("none", 7, [0.5])
    with pytest.raises(NamelistError, match=r"unknown group '&asim_nml' \(did you mean 'assim_nml'\?\)"):
        load(write(tmp_path, BASE), ["asim_nml.method=none"])
    assert parse_override("obs_nml.variables='u','h'") == ("obs_nml", "variables", ["u", "h"])


def test_effective_namelist_round_trips(tmp_path):
    cfg = load(write(tmp_path, BASE), ["assim_nml.b_scale=0.5"])
    out = cfg.write(tmp_path / "effective.nml")
    again = load(out)
    for name in GROUPS:
        attr = {"coupler_nml": "coupler", "grid_nml": "grid", "bridge_nml": "bridge", "assim_nml": "assim",
                "obs_nml": "obs", "twin_nml": "twin", "l96_nml": "l96", "sw_nml": "sw"}[name]
        assert getattr(again, attr) == getattr(cfg, attr), name
    assert f90nml.read(out)["model_own_nml"]["whatever"] == "x"


def test_cli_check_reports_error_without_traceback(tmp_path):
    path = write(tmp_path, BASE + "&obs_nml\n netwrk = 'all'\n/\n")
    proc = lodas("check", str(path))
    assert proc.returncode == 2
    assert "unknown key 'netwrk' (did you mean 'network'?)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_check_prints_layout_and_json(tmp_path):
    proc = lodas("check", str(REPO / "namelists" / "l96_twin.nml"), "--host-ranks", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "host rank 3: x = 31..40 of 40" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith('{"valid": true')
    bad = lodas("check", str(REPO / "namelists" / "l96_twin.nml"), "--host-ranks", "3")
    assert bad.returncode == 2 and "host_ranks = 3 does not divide the 40 grid points" in bad.stderr


FORTRAN_GROUPS = {"bridge_nml": "lodas_bridge.f90", "l96_nml": "l96_host.f90", "sw_nml": "sw_host.f90"}


@pytest.mark.parametrize("group", sorted(FORTRAN_GROUPS))
def test_fortran_and_python_read_the_same_keys(group):
    src = (REPO / "fortran_stubs" / FORTRAN_GROUPS[group]).read_text()
    src = re.sub(r"&[ \t]*\n[ \t]*&?", " ", src)          # join free-form continuation lines
    m = re.search(rf"namelist\s*/{group}/\s*(.+?)\n", src, re.IGNORECASE)
    assert m, f"no namelist /{group}/ declaration in {FORTRAN_GROUPS[group]}"
    fortran_keys = {k.strip().lower() for k in m.group(1).replace("&", "").split(",")}
    import dataclasses

    assert fortran_keys == {f.name for f in dataclasses.fields(GROUPS[group])}


def test_status_codes_match_the_fortran_module():
    from bridges.status import Status

    src = (REPO / "fortran_stubs" / "lodas_bridge.f90").read_text()
    for s in Status:
        assert re.search(rf"LODAS_{s.name}\s*=\s*{int(s)}\b", src), s
