"""Train a small draft model for a target on the target's own greedy outputs (`tetrispec distill`).

data.py collects prompts and generates the target's continuations with the batched engine;
train.py builds and trains the draft; eval.py measures it against the target on held-out
prompts.
"""
