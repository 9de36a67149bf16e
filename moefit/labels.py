"""The label of a token that carries no loss (the Hugging Face / PyTorch convention, `ignore_index` of
cross-entropy): written by the data pipeline (prompts, padding, the first token of each sample), skipped by the
model's loss and by the trainer's token count. One copy, imported everywhere."""

IGNORE_INDEX = -100
