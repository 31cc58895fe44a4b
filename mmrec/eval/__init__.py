"""mmrec.eval"""
