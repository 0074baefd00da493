# API-SS, the paper's settings (the original's scriptskd/ss.sh): one dataset (CIFAR-FS), one API
# architecture, 5-way 1-shot, conv4 meta model, zero-order queries. Everything else the script sets is
# the default already (core/config.py holds the original's argparse defaults).
#   python main.py --preset paper_ss [--num_sup_train 5 --num_sup_test 5] [--pre_backbone resnet10]
num_sup_train, num_sup_test = 1, 1
advstartit = 4000
ZO = True
