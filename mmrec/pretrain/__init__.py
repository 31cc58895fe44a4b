"""mmrec.pretrain"""
