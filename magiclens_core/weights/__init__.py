"""Weights on disk: the official release's .pkl, this project's model folder, open_clip backbones."""
