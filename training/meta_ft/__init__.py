"""Meta-trained single-step updates ("Can gradient descent simulate prompting?", Zhang et al. 2025)."""
