"""cellseg.tracking"""
