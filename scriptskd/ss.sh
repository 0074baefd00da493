#!/usr/bin/env bash
# API-SS: one dataset (CIFAR-FS), one API architecture (conv4; or --pre_backbone resnet10/resnet18).
# The paper's settings are the preset config/paper_ss.py; extra flags pass through and override it:
#   bash scriptskd/ss.sh --num_sup_train 5 --num_sup_test 5      # 5-shot
#   bash scriptskd/ss.sh --resume                                # continue an interrupted run
#   bash scriptskd/ss.sh --multigpu 2 --gpu 0                    # run on physical GPU 2
# NPROC=4 bash scriptskd/ss.sh ...   one run over 4 processes (torchrun; one GPU each; docs/distributed.md).
set -eo pipefail
. "$(dirname "$0")/env.sh"
exec "${BIDF_LAUNCH[@]}" main.py --preset paper_ss "$@"
