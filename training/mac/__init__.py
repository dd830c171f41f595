"""MAC (memory of amortized contexts, Tack et al. 2024): documents become memory tokens in one
forward pass; questions aggregate the memory into a P-tuning v2 prefix of the frozen base model."""
