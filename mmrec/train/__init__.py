"""mmrec.train"""
