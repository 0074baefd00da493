"""Write split/meta_{train,val,test}.csv for MiniImageNet (DFL2Ldata/Miniimagenet/{meta_train,meta_val,meta_test}/<class>/*).

Usage: python write_miniimagenet_filelist.py [--data_root ./DFL2Ldata]
"""
from core.cli import run
from dataset.filelist import main

if __name__ == "__main__":
    run(main, "miniimagenet")
