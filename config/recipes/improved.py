# The variants that beat the faithful recipe in the ablation, with intervals apart (docs/differences.md).
init = "torch"
