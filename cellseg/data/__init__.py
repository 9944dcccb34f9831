"""Data: layouts, synthetic stacks, ingest to Zarr, stores, loading codes, datasets, subimages."""
