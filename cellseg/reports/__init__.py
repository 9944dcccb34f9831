"""Reports built from the reproduction pipeline's results (``cellseg report``)."""
