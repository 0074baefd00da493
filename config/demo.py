# The embedded demo (bash scriptskd/demo.sh): API-SS on the generated demo dataset at a scale a
# 2-core CPU runs in minutes. A pool of 8 conv4 APIs (20 epochs), 400 tasks, zero-order queries
# with q 20 and 40 generator steps, evaluation on 100 tasks every 100 tasks.
dataset = "demo"
way_train, num_sup_train, num_qur_train = 5, 1, 15
way_test, num_sup_test, num_qur_test = 5, 1, 15
episode_train, episode_test = 400, 100
val_interval, save_interval = 100, 100
APInum, pre_backbone, epochs = 8, "conv4", 20
ZO, q, mu, numsplit = True, 20, 0.005, 1
generate_iterations, Glr = 40, 0.001
num_sup_kd, num_qur_kd, inner_update_num_kd = 5, 15, 10
generate_interval, adv, advstartit = 4, 1.0, 25
