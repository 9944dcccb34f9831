"""cellseg.engine"""
