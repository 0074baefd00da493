#!/usr/bin/env bash
# Pretrain the API pool with the original's settings: 100 conv4 APIs, 5-way, on CIFAR-FS.
# Extra flags are passed through and override these (the last occurrence wins), e.g.
#   bash scriptskd/pretrain.sh --dataset demo --APInum 10
#   bash scriptskd/pretrain.sh --dataset miniimagenet --pre_backbone resnet18
# NPROC=4 bash scriptskd/pretrain.sh ...   shards the pool over 4 processes (torchrun; one GPU each).
set -eo pipefail
. "$(dirname "$0")/env.sh"
launch=(python)
if [ "${NPROC:-1}" -gt 1 ]; then
  launch=(python -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
fi
exec "${launch[@]}" pretrain.py \
  --dataset cifar100 \
  --pre_backbone conv4 \
  --APInum 100 \
  --way_pretrain 5 \
  --pretrained_path_prefix ./pretrained_blackbox \
  "$@"
