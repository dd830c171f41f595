"""The per-document update bank: each document's single-step update kept as its own low-rank
delta in a memory bank, and applied per request to the questions whose key selects it (a third way
to use one step, beside accumulating steps in a stream and the isolated step)."""
