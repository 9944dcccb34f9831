"""cellseg.inference"""
