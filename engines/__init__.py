"""Bundle graphs -> TensorRT: what TensorRT's parser accepts (`tensorrt_support`, `tensorrt_check`), the build plan
(`plan`), the builder (`builder`) and where plans go in the bundle (`store`), plans against onnxruntime fp32
(`compare`), and the `llava-engines` command (`cli`)."""
