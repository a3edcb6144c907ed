"""Images: robust decoding, image cells of datasets, preprocessing and pixel batches.

`decode` and `sources` import no torch, so light processes (the HTTP ingress, CPU decode tasks) can use them."""
