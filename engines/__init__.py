"""Bundle graphs -> TensorRT: what TensorRT accepts, and (later) plans built from the graphs."""
