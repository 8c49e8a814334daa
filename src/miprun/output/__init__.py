"""Writing the results: the checkpoint, its manifest and report, atomically."""
