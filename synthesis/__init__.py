"""Black-box data recovery: the API wrapper and pool, the zero-order estimator, generator inversion
and the task memory (docs/method.md).

    from synthesis.api import BlackBoxAPI        from synthesis.zo import zo_grad, surrogate
    from synthesis.pool import APIPool           from synthesis.recover import ZOConfig, recover
    from synthesis.memory import TaskMemory
(The function `recover` is not re-exported here: it would hide the module synthesis.recover.)
"""
from .api import BlackBoxAPI, QueryBudgetExceeded, QueryMeter, inference_forward, load_api
from .memory import TaskMemory, check_replay_flags
from .pool import APIPool
from .recover import ZOConfig, save_grid
from .zo import surrogate, zo_grad
