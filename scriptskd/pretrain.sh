#!/usr/bin/env bash
# Pretrain an API pool with the original's settings (by default 100 conv4 5-way APIs on CIFAR-FS;
# every default is in core/config.py). Extra flags are passed through, e.g.
#   bash scriptskd/pretrain.sh --dataset miniimagenet --pre_backbone resnet18
#   bash scriptskd/pretrain.sh --preset demo
# NPROC=4 bash scriptskd/pretrain.sh ...   shards the pool over 4 processes (torchrun; one GPU each).
set -eo pipefail
. "$(dirname "$0")/env.sh"
exec "${BIDF_LAUNCH[@]}" pretrain.py "$@"
