"""What the tests, benchmarks, examples and the CLI share; not imported by ring_ext itself.

reference   the float64 oracle (attention, LSE merge, the per-token-pair mask)
tolerances  the one tolerance rule: at most 2x PyTorch's own error against the oracle
spawn       run a function on N local Gloo ranks (free_port, run_distributed)
documents   synthetic packed rows: document lengths and their cu_seqlens
"""
