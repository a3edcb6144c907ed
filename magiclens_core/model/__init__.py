"""The MagicLens network: configs, layers, the model and its tokenizer."""
