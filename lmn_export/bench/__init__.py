"""`lmn-bench`: the benchmark, apart from the export.

Modules, one job each:
- command: the click command (arguments checked where they enter, then `suite.run`, then the report)
- settings: what a run measures (sections, sizes, threads)
- suite: runs the sections asked for and summarizes them
- timing: per-token latency samples and their summary
- baselines: the graphs the LMN is timed against (a same-width GPT-2 with a KV cache, the memory-free LMN)
- decode: decode latency per context and time to first token, LMN against the GPT-2 KV caches
- decode_speed: decode speed per preset and precision, against the memory-free twin and the floor
- floor: the weight bytes a token reads and this machine's read bandwidth (the floor)
- quality: held-out bits per character
- footprint: file bytes and resident memory per precision against the weights
- train: training throughput of LMN and GPT-2 presets
- report: the printed report, the JSON text and the charts
"""
