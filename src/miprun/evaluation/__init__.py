"""Evaluating pruned models: held-out perplexity, zero-shot tasks, speed, and side-by-side comparisons."""
