"""The numba compile options shared by URSM's compiled kernels (``kernels``, ``polya_gamma``)."""
from __future__ import annotations

import functools

import numba as nb

# error_model="numpy": a division by zero yields inf / nan instead of raising ZeroDivisionError.
# With numba's default ("python") every division carries a zero test and an exception path, which
# kept the inlined binomial sampler from being scheduled tightly: the bulk allocations cost 0.78x
# with "numpy", same draws bit for bit (checked on seeded fits). Every divisor here is positive by
# construction, or checked before the division where it comes from the data.
njit = functools.partial(nb.njit, cache=True, error_model="numpy")
