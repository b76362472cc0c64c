"""spac-export: turns a Hugging Face MoE model and a dense draft into a spac package (trunk
ONNX graphs, one ONNX graph and .data file per routed expert, the tokenizer, manifest.yaml).
The only part of spac that needs torch and transformers."""
