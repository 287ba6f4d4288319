# lodas: the two commands of the README, and what they need.
#   make demo   set up if needed, build the Fortran hosts, run the shallow-water twin experiment
#   make test   set up if needed, build, run every test
SHELL   := /bin/bash
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.lodas-setup-done
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup build demo test bench train clean

setup: $(STAMP)

# Idempotent: Debian packages only when a tool is missing; the venv only when setup.py changed.
# mpi4py is built from source against the system MPICH (pip caches the wheel: minutes once).
$(STAMP): setup.py
	@command -v mpif90 >/dev/null && command -v mpiexec >/dev/null || { \
	  echo "installing gfortran, mpich, libmpich-dev"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gfortran mpich libmpich-dev >/dev/null; }
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-binary mpi4py mpi4py
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

build: setup
	$(MAKE) -s -C fortran_stubs

demo: build
	$(PY) -m coupler twin namelists/sw_demo.nml --plot

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) benchmarks/coupling_overhead.py
	$(PY) -m coupler bench l96 --methods none,3dvar,etkf,dps,sda,lo-sda --cycles 1200 --set twin_nml.spinup_cycles=200
	$(PY) -m coupler bench sw --methods none,3dvar,dps,sda,lo-sda --cycles 120 --set twin_nml.spinup_cycles=20
	$(PY) -m coupler bench sw --methods 3dvar,dps,sda,lo-sda --cycles 240 --set twin_nml.spinup_cycles=120
	$(PY) -m coupler bench sw --methods none,3dvar,etkf,dps,sda,lo-sda --cycles 240 --set twin_nml.spinup_cycles=120 --set twin_nml.spinup_steps=21120
	$(PY) benchmarks/cycle_drift.py --methods 3dvar
	$(PY) -m coupler bench l96 --namelist namelists/l96_half_bench.nml --methods none,3dvar,etkf,dps,sda,lo-sda --cycles 1200 --set twin_nml.spinup_cycles=200
	$(PY) benchmarks/memory_bound.py --methods 3dvar,etkf,sda,lo-sda
	$(PY) benchmarks/replay_throughput.py
#   longer: $(PY) benchmarks/lo_sda_scaling.py   (LO-SDA steps / iterations / members, ~10 min)

train: build
	$(PY) -m coupler train namelists/l96_train.nml
	$(PY) -m coupler train namelists/l96_half_train.nml
	$(PY) -m coupler train namelists/sw_train.nml

clean:
	$(MAKE) -s -C fortran_stubs clean
	rm -rf lodas_output
