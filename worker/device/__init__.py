"""The device side: the engine (inference batcher, detectors' forward passes), the tensor
decode and preprocessing path, and the inference process of a GPU node with its socket
client and wire format."""
