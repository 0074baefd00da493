"""The method: functional MAML, bi-level KD, memory replay, the meta-training loop (and API pretraining)."""
