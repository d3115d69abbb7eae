"""Quality measurement: BLEU and semantic similarity, engine against engine."""
