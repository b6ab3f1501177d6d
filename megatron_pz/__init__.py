"""megatron_pz: PretrainZero reinforcement active pretraining on Megatron-Core.

Importing the package starts nothing and imports neither Megatron nor CUDA libraries.
"""
__version__ = "0.1.0"
