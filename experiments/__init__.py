"""Accuracy experiments on the demo, each writing a results JSON, and the tables of README.md and docs/
generated from the committed results (results/*.json): `python -m experiments.tables`. Speed lives in bench/."""
