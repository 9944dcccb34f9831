"""cellseg: cell segmentation on hyper-labeled image stacks.

The public API used by notebooks and tests is re-exported here.
"""

__version__ = "0.1.0"
