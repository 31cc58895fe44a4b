"""mmrec.fusion"""
