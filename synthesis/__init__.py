"""What touches an API: the black-box wrapper and its pool, the zero-order estimator and generator
inversion (docs/method.md).

    from synthesis.api import BlackBoxAPI        from synthesis.zo import zo_grad, surrogate
    from synthesis.pool import APIPool           from synthesis.recover import recover
(The function `recover` is not re-exported here: it would hide the module synthesis.recover.)
"""
from .api import BlackBoxAPI, QueryBudgetExceeded, QueryMeter, load_api
from .pool import APIPool
from .recover import save_grid
from .zo import surrogate, zo_grad
