"""The model: where its blocks and their parts live (layouts), loading, placement, surgery, fingerprints."""
