"""The pure core: the models planner, sweep and adaptive controller share, written once.

No `nn.Module`, no I/O, no CLI here. Import from the submodules (`batchlab.core.optim`,
`batchlab.core.lr`, `batchlab.core.batching`, `batchlab.core.step_time`, ...).
"""
