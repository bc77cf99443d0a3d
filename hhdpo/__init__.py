"""hhdpo: DPO training and LLM-judged evaluation on Anthropic HH-RLHF."""

__version__ = "0.1.0"
