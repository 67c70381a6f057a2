"""The model contract shared by `train` and `serve`, and the folder where exported models live.

See `models/contract.py` for what a model folder holds and `models/imageio.py` for image decoding.
"""
