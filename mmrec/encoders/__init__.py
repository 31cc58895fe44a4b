"""mmrec.encoders"""
