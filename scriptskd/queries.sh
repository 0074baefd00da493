#!/usr/bin/env bash
# Meta-test accuracy against API queries on the demo (docs/queries.md): the paper's recovery at its full
# query count, 1/3 of it and one visit (its least), --meta_generator unbudgeted, at 1/10 and 1/30, at
# 1/10 with --zo_resolution 4, and the control (4 steps from a fresh generator); 600-task 5-way 1-shot accuracy per row; results.json,
# results.md and figs/accuracy_vs_queries.png in --out.
#   bash scriptskd/queries.sh [--demo_dir runs/demo-...] [--rows paper_full,mg_1_10] [--out runs/queries]
set -eo pipefail
. "$(dirname "$0")/env.sh"
exec python -m experiments.queries "$@"
