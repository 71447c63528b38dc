"""Pure-numpy math core: slicing, binary codebook fitting, bit packing, cost accounting.

Nothing in this package imports protobuf or torch.
"""
