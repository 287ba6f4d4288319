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
                "obs_nml": "obs", "twin_nml": "twin", "l96_nml": "l96", "sw_nml": "sw", "train_nml": "train",
                "replay_nml": "replay"}[name]
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


# ------------------------------------------------------------------ &obs_nml: several network kinds
SW_BASE = """
&grid_nml
    nx = 16
    ny = 8
    variables = 'u', 'v', 'h'
/
"""


def test_obs_network_one_kind_or_a_list_and_footprint_defaults(tmp_path):
    cfg = load(write(tmp_path, SW_BASE))
    assert cfg.obs.network == ["all"]
    assert (cfg.obs.footprint, cfg.obs.footprint_variables, cfg.obs.footprint_error_std) == (8, [], [1.0])
    cfg = load(write(tmp_path, SW_BASE + "&obs_nml\n network = 'stations'\n/\n"))
    assert cfg.obs.network == ["stations"]
    text = SW_BASE + ("&obs_nml\n network = 'stations', 'footprints'\n footprint = 4\n"
                      " footprint_variables = 'h', 'u'\n footprint_error_std = 0.5, 0.1\n/\n")
    cfg = load(write(tmp_path, text))
    assert cfg.obs.network == ["stations", "footprints"]
    assert cfg.observed_variables("footprints") == ["h", "u"] and cfg.observed_variables() == ["u", "v", "h"]
    again = load(cfg.write(tmp_path / "effective.nml"))
    assert again.obs == cfg.obs
    cfg = load(write(tmp_path, SW_BASE), ["obs_nml.network='every_k','footprints'", "obs_nml.footprint=2"])
    assert cfg.obs.network == ["every_k", "footprints"] and cfg.obs.footprint == 2


def test_error_std_per_variable_is_indexed_by_state_variable(tmp_path):
    """One value per *state* variable (what synthesize indexes by var_index), nan where not observed."""
    import math

    text = SW_BASE + ("&obs_nml\n network = 'stations', 'footprints'\n variables = 'h', 'u'\n error_std = 2.0, 0.5\n"
                      " footprint_variables = 'v'\n footprint_error_std = 0.3\n/\n")
    cfg = load(write(tmp_path, text))
    e = cfg.error_std_per_variable()
    assert e[0] == 0.5 and math.isnan(e[1]) and e[2] == 2.0               # u, v, h
    assert str(cfg.error_std_per_variable("stations")) == str(e)           # nan != nan
    f = cfg.error_std_per_variable("footprints")
    assert math.isnan(f[0]) and f[1] == 0.3 and math.isnan(f[2])
    cfg = load(write(tmp_path, SW_BASE + "&obs_nml\n variables = 'v'\n error_std = 0.7\n/\n"))
    e = cfg.error_std_per_variable()
    assert len(e) == 3 and e[1] == 0.7 and math.isnan(e[0]) and math.isnan(e[2])
    cfg = load(write(tmp_path, SW_BASE + "&obs_nml\n error_std = 0.1, 0.2, 0.3\n/\n"))
    assert cfg.error_std_per_variable() == [0.1, 0.2, 0.3]
    assert cfg.error_std_per_variable("footprints") == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("obs, expected", [
    ("network = 'stations', 'satelite'", r"&obs_nml network = 'satelite': expected one of .*'footprints'"),
    ("network = 'stations', 'stations'", r"&obs_nml network = \['stations', 'stations'\]: expected distinct kinds"),
    ("network = 'footprints'\n footprint = 3", r"&obs_nml footprint = 3: expected a divisor of &grid_nml nx = 16"),
    ("network = 'footprints'\n footprint = 16", r"&obs_nml footprint = 16: expected a divisor of &grid_nml ny = 8"),
    ("footprint = 0", r"&obs_nml footprint = 0: expected a value >= 1"),
    ("footprint_variables = 'q'", r"&obs_nml footprint_variables: 'q' is not a grid variable"),
    ("footprint_variables = 'u', 'u'", r"&obs_nml footprint_variables = \['u', 'u'\]: expected distinct"),
    ("footprint_variables = 'u', 'h'\n footprint_error_std = 1.0, 2.0, 3.0",
     r"&obs_nml footprint_error_std = \[1.0, 2.0, 3.0\]: expected 1 or 2 values .*\['u', 'h'\]"),
    ("footprint_error_std = 0.0", r"&obs_nml footprint_error_std = 0.0: expected a value > 0"),
    ("variables = 'h'\n error_std = 1.0, 2.0", r"&obs_nml error_std = \[1.0, 2.0\]: expected 1 value \(one per variable observed by &obs_nml variables: \['h'\]\)"),
    ("network = 'stations'\n n_stations = 129", r"&obs_nml n_stations = 129: expected at most the 128 grid points"),
])
def test_obs_consistency_errors(tmp_path, obs, expected):
    path = write(tmp_path, SW_BASE + f"&obs_nml\n {obs}\n/\n")
    with pytest.raises(NamelistError, match=expected) as info:
        load(path)
    assert str(path) in str(info.value)


def test_unused_footprint_keys_are_not_checked_against_the_grid(tmp_path):
    cfg = load(write(tmp_path, SW_BASE + "&obs_nml\n network = 'stations'\n footprint = 3\n/\n"))
    assert cfg.obs.footprint == 3
