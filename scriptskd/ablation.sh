#!/usr/bin/env bash
# The ablation of docs/differences.md: the demo with the faithful defaults, each variant alone, all the
# earlier project variants together, and --recipe improved; 600-task 5-way 1-shot accuracy per row.
#   bash scriptskd/ablation.sh [--rows faithful,init_torch] [--jobs 2] [--out runs/ablation]
set -eo pipefail
. "$(dirname "$0")/env.sh"
exec python -m experiments.ablation "$@"
