#!/usr/bin/env bash
# API-SH: one dataset (CIFAR-FS), each API visit draws the architecture among conv4/resnet10/resnet18.
# The paper's settings are the preset config/paper_sh.py; extra flags pass through and override it:
#   bash scriptskd/sh.sh --num_sup_train 5 --num_sup_test 5      # 5-shot
#   bash scriptskd/sh.sh --resume                                # continue an interrupted run
#   bash scriptskd/sh.sh --multigpu 2 --gpu 0                    # run on physical GPU 2
# NPROC=4 bash scriptskd/sh.sh ...   one run over 4 processes (torchrun; one GPU each; docs/distributed.md).
set -eo pipefail
. "$(dirname "$0")/env.sh"
exec "${BIDF_LAUNCH[@]}" main.py --preset paper_sh "$@"
