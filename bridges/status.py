"""Status codes shared by the Fortran bridge (``fortran_stubs/lodas_bridge.f90``) and the driver.

A non-zero status always travels with a *zero* increment: the host never receives a
partial or non-finite analysis. The host decides what to do (``&bridge_nml on_failure``).
The integer values are a wire contract; ``tests/test_fortran_contract.py`` checks that
the Fortran parameters carry the same values.
"""
from __future__ import annotations

import enum


class Status(enum.IntEnum):
    OK = 0                 #: analysis applied
    NO_OBSERVATIONS = 1    #: no observation file for this cycle: zero increment, warning
    BAD_BACKGROUND = 2     #: NaN/Inf in the background: cycle skipped, zero increment
    ANALYSIS_FAILED = 3    #: the analysis raised: zero increment, traceback in the driver log
    BAD_INCREMENT = 4      #: the analysis produced NaN/Inf: replaced by a zero increment
    NO_BACKGROUND = 5      #: replay: the archived background of this cycle could not be read: zero increment
    CONFIG_ERROR = 10      #: host and driver disagree (grid, variables, decomposition)
    TIMEOUT = 11           #: the driver did not answer within &bridge_nml deadline_s
    PROTOCOL_ERROR = 12    #: messages out of order (e.g. get before put, ranks out of step)

    @property
    def label(self) -> str:
        return self.name.lower()
