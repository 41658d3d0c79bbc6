"""Model implementations (one file per architecture) and their registry."""
