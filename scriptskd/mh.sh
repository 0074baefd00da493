#!/usr/bin/env bash
# API-MH: each API visit draws the dataset (cifar100/miniimagenet/cub) and the architecture.
# The paper's settings are the preset config/paper_mh.py; extra flags pass through and override it:
#   bash scriptskd/mh.sh --num_sup_train 5 --num_sup_test 5      # 5-shot
#   bash scriptskd/mh.sh --resume                                # continue an interrupted run
#   bash scriptskd/mh.sh --multigpu 2 --gpu 0                    # run on physical GPU 2
# NPROC=4 bash scriptskd/mh.sh ...   one run over 4 processes (torchrun; one GPU each; docs/distributed.md).
set -eo pipefail
. "$(dirname "$0")/env.sh"
exec "${BIDF_LAUNCH[@]}" main.py --preset paper_mh "$@"
