"""GPU-side support that CPU rehearsal never needs: the CUDA health probe an agent runs
before it hands a local rank to a warm spare (:mod:`.health`), and the torch/NCCL
environment in-process recovery needs on NCCL (:mod:`.env`). Nothing here imports CUDA
state at module import: the agent imports it without touching a GPU.
"""
