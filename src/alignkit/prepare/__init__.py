"""Before training: the base model materialised once, and training data made from a model's own answers —
preference pairs against reference answers (`pairs`), best-of-N samples scored by a reward model
(`rejection_sampling`)."""
