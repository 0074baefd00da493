# API-SS, the paper's settings (the original's scriptskd/ss.sh): one dataset (CIFAR-FS), one API
# architecture, 5-way 1-shot, conv4 meta model, zero-order queries.
#   python main.py --preset paper_ss [--num_sup_train 5 --num_sup_test 5] [--pre_backbone resnet10]
dataset = "cifar100"
way_train, num_sup_train, num_qur_train = 5, 1, 15
way_test, num_sup_test, num_qur_test = 5, 1, 15
backbone = "conv4"
episode_train, episode_test = 240000, 600
inner_update_num, test_inner_update_num = 5, 10
start_id, inner_lr, outer_lr, episode_batch = 1, 0.01, 0.001, 4
val_interval, save_interval = 2000, 2000
num_sup_kd, num_qur_kd, inner_update_num_kd = 30, 30, 10
adv, advstartit = 1.0, 4000
way_pretrain, pre_backbone = 5, "conv4"
generate_interval, generate_iterations, Glr = 200, 200, 0.001
ZO, mu, q, numsplit = True, 0.005, 100, 5
