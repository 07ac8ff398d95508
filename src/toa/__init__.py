"""toa: multi-agent data synthesis (SFT and DPO) with tree search, after the TOA paper
("Multi-Agent Sampling: Scaling Inference Compute for Data Synthesis with Tree Search-Based
Agentic Collaboration", arXiv 2412.17061)."""

__version__ = "0.1.0"
