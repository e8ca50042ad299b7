"""Reading and writing tensors: sources, safetensors, the writer, integrity checks,
PEFT adapters, task-vector views, contents and output directories."""
