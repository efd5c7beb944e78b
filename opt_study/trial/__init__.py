"""One trial on every rank: the loop (`loop`), the DeepSpeed engine (`engine`), checkpoints,
parameter snapshots for replay, and the driver's stop channel (`control`, torch-free).

Import the submodules explicitly: the driver imports `control` without pulling in torch.
"""
