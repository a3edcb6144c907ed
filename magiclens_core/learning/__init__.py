"""Learning: the contrastive loss and the Ray-free learner."""
