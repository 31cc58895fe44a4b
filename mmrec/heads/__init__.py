"""mmrec.heads"""
