"""fromlogits: does it matter whether a classifier's loss reads probabilities or logits?"""
