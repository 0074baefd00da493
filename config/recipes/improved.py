# The variants that beat the faithful recipe in the ablations, intervals apart on every seed run
# (docs/differences.md, B7).
init = "torch"
keep_best = "image"
api_output = "probs"
