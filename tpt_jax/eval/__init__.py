"""`tpt eval`: held-out perplexity and generation evals with answer extraction."""
