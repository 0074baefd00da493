"""Write split/meta_{train,val,test}.csv for CIFAR-FS (DFL2Ldata/cifar100/{meta_train,meta_val,meta_test}/<class>/*.png).

Usage: python write_cifar100_filelist.py [--data_root ./DFL2Ldata]
"""
from core.cli import run
from dataset.filelist import main

if __name__ == "__main__":
    run(main, "cifar100")
