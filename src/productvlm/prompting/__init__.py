"""What the model is asked and how its answer is read: templates, the prompt settings saved beside a
model's weights, the answer parser, constrained decoding, and the scores of parsed answers.

Pure text and token logic: imports nothing from data/, models/ or above.
"""
