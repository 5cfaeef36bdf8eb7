"""`eval` and `predict`: generate on a split, score it and write the report; catalog entries for photos."""
