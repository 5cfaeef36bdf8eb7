"""Evaluation: parse generated answers and score them."""
