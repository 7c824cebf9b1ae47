"""`mtad-trt bench`: evaluation, apart from the runtime it measures.

`run` (the benchmark loop), `interleave` (the order: per prompt or batch, rotated), `journal`
(`records.jsonl`, resume), `summary` (records -> summaries and paired statistics), `stats`
(bootstrap and Wilson intervals, the `sps` control), `report` (markdown, plots, the JSON record),
`prompts` (offline prompt sets), `peers` (other runtimes on the same prompts), `sandbox` (HumanEval
execution), `quality` (perplexity), `metrics` (latency, pass@k, energy ratios), `energy/` (one
module per meter).
"""
