"""Engine adapters: thin layers that place batched kernels on Dask or Ray.

Numerics modules never import these; these never contain numerics.
"""
