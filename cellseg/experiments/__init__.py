"""cellseg.experiments"""
