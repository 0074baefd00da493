# The original's method: the defaults of core/config.py as they are (docs/differences.md).
