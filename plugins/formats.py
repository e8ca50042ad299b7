"""Built-in input formats: PEFT adapter directories, HF model directories, safetensors files."""

from pathlib import Path

from compressor.hookspecs import hookimpl
from compressor.io.peft import PeftAdapter, is_adapter_dir
from compressor.io.sources import SourceReader, open_model_dir, open_safetensors_file


@hookimpl
def register_sources(register):
    register(
        SourceReader(
            "peft-adapter",
            "PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)",
            is_adapter_dir,
            PeftAdapter,
        )
    )
    register(
        SourceReader(
            "hf-model-dir",
            "Hugging Face model directory, single file or sharded with an index",
            Path.is_dir,
            open_model_dir,
            catch_all=True,
        )
    )
    register(
        SourceReader(
            "safetensors-file",
            "a .safetensors file",
            Path.is_file,
            open_safetensors_file,
            catch_all=True,
        )
    )
