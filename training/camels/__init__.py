"""CaMeLS: context-aware meta-learned loss scaling (Hu et al. 2023)."""
