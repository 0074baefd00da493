# The embedded demo (bash scriptskd/demo.sh): API-SS on the generated demo dataset at a scale a
# 2-core CPU runs in minutes. A pool of 8 conv4 APIs (20 epochs), 400 tasks, zero-order queries
# with q 20 and 40 generator steps, evaluation on 100 tasks every 100 tasks.
dataset = "demo"
num_sup_train, num_sup_test = 1, 1
episode_train, episode_test = 400, 100
val_interval, save_interval = 100, 100
APInum, epochs = 8, 20
ZO, q, numsplit = True, 20, 1
generate_iterations = 40
num_sup_kd, num_qur_kd = 5, 15
generate_interval, advstartit = 4, 25
