"""Obviously-correct references (slow, float64, written from the definitions).

The fast code of every pillar is tested against these; they are public so users can check the
library on their own data. Each reference states its formula in its docstring.
"""

from gradstats.testing._distributed import run_gloo
from gradstats.testing._moments import reference_ema, reference_moments, welford_loop

__all__ = ["reference_ema", "reference_moments", "run_gloo", "welford_loop"]
