#!/usr/bin/env bash
# API-SH: one dataset (CIFAR-FS), each API visit draws the architecture among conv4/resnet10/resnet18.
# The paper's settings (5-way 1-shot, conv4 meta model, zero-order queries q 100, mu 0.005).
# Extra flags are passed through and override these (the last occurrence wins), e.g.
#   bash scriptskd/sh.sh --num_sup_train 5 --num_sup_test 5      # 5-shot
#   bash scriptskd/sh.sh --resume                                # continue an interrupted run
#   bash scriptskd/sh.sh --multigpu 2 --gpu 0                    # run on physical GPU 2
set -eo pipefail
. "$(dirname "$0")/env.sh"
exec python main.py \
  --dataset cifar100 \
  --way_train 5 --num_sup_train 1 --num_qur_train 15 \
  --way_test 5 --num_sup_test 1 --num_qur_test 15 \
  --backbone conv4 \
  --episode_train 240000 --episode_test 600 \
  --inner_update_num 5 --test_inner_update_num 10 \
  --start_id 1 --inner_lr 0.01 --outer_lr 0.001 --episode_batch 4 \
  --val_interval 2000 --save_interval 2000 \
  --num_sup_kd 30 --num_qur_kd 30 --inner_update_num_kd 10 \
  --adv 1 --advstartit 4000 \
  --way_pretrain 5 --pre_backbone mix \
  --generate_interval 200 --generate_iterations 200 --Glr 0.001 \
  --ZO --mu 0.005 --q 100 --numsplit 5 \
  "$@"
