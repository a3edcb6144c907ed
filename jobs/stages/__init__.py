"""The Ray Data stages the jobs compose: sources, image reading and embedding, triplets."""
