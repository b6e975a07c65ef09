"""gridlab: is it better to prune a large pretrained parent or train the small model from scratch?"""

__version__ = "0.2.0"
