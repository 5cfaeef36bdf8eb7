"""Running a model: photos + prompt settings -> model inputs (`inputs`), batched generation with
per-row stops (`generate`), a loaded model with its settings (`predictor.Predictor`), device/dtype choice."""
