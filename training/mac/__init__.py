"""MAC (memory of amortized contexts, Tack et al. 2024): documents become memory entries in one
forward pass, no gradient step; questions read their top-k entries as key/values of the frozen
base model."""
