"""Search: the metadata filter language and the LanceDB image table."""
