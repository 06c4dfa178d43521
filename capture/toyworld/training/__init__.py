"""Training stages of the toy-world models, shared by the UNet and the MM-DiT families (``capture.toyworld.train``)."""
