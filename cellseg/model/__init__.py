"""cellseg.model"""
