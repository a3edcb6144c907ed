"""The Ray Serve application answering MagicLens queries."""
