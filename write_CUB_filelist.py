"""Write split/meta_{train,val,test}.csv for CUB-200-2011 (DFL2Ldata/CUB_200_2011/images/<class>/*.jpg).

Classes in sorted order, index i: even -> meta_train, i%4==1 -> meta_val, i%4==3 -> meta_test.

Usage: python write_CUB_filelist.py [--data_root ./DFL2Ldata]
"""
from core.cli import run
from dataset.filelist import main

if __name__ == "__main__":
    run(main, "cub")
