"""mmrec.graph"""
