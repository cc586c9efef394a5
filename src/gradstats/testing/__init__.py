"""Obviously-correct references (slow, float64, written from the definitions).

The fast code of every pillar is tested against these; they are public so users can check the
library on their own data. Each reference states its formula in its docstring.
"""

from gradstats.testing._distributed import run_gloo
from gradstats.testing._eqprop import (
    LinearClosedForm,
    dense_jacobian,
    finite_difference_gradient,
    newton_fixed_point,
    reference_implicit_gradient,
    reference_spectral_penalty,
)
from gradstats.testing._fisher import (
    causal_lm_objective,
    labelled_gradients,
    per_sample_gradients,
    positionwise_fisher,
    reference_fisher,
    reference_group_values,
)
from gradstats.testing._moments import reference_ema, reference_moments, welford_loop
from gradstats.testing._per_sample import reference_per_sample_noise
from gradstats.testing._scaling import reference_scaler_statistics, reference_two_batch
from gradstats.testing._state import assert_state_equal

__all__ = [
    "LinearClosedForm",
    "assert_state_equal",
    "causal_lm_objective",
    "dense_jacobian",
    "finite_difference_gradient",
    "labelled_gradients",
    "newton_fixed_point",
    "per_sample_gradients",
    "positionwise_fisher",
    "reference_ema",
    "reference_fisher",
    "reference_group_values",
    "reference_implicit_gradient",
    "reference_moments",
    "reference_per_sample_noise",
    "reference_scaler_statistics",
    "reference_spectral_penalty",
    "reference_two_batch",
    "run_gloo",
    "welford_loop",
]
