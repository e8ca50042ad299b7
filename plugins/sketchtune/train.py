"""``train -p sketchtune``: tune a sketch's tables on data, codes fixed."""

from __future__ import annotations

from compressor.errors import InputError, OptionError
from compressor.learning.training import training_options
from compressor.method import Manifest, Method, Option
from compressor.plugins.sketchtune.config import ENCODING, module_of
from compressor.plugins.sketchtune.decoded import DecodedSketch, swap_in_sketches


class SketchTrain(Method):
    """Fine-tune a sketch's tables on data; codes, dense tensors and head stay frozen.

    Trainable parameters: Σ rows × G × 2^b over the sketched linears (about LoRA at rank
    8·G on the same projections at 4 bits). AdamW without weight decay (the tables are
    weights, not a correction), clipping 1.0; ``objective`` ce needs the classification
    head the model was saved with, lm a causal LM. The result holds only the tables; its
    parent is the sketch, whose codes it decodes with.
    """

    name = "sketchtune"
    kind = "train"
    uses_device = True  # the model and its tables (and their optimizer state)
    summary = "SketchTune: fine-tune only a sketch's lookup tables (codes frozen)"
    reference = "https://arxiv.org/abs/2410.06364"
    version = "1"
    reads_raw = (ENCODING,)
    example_options = {"data": "train.jsonl"}
    options = (
        *training_options(steps=100, lr=3e-4, trained="the tables"),
        Option("seed", "int", 0, "seed of the row order and dropout"),
    )

    def run(self, job):
        import torch

        from compressor.learning.data import read_examples
        from compressor.learning.tasks import Task, check_head, objective_for
        from compressor.learning.training import Trainer, row_batches, show_loss
        from compressor.models.modeling import source_model

        opts, raw = job.options, job.inputs[0]
        if not opts["data"]:
            raise OptionError("sketchtune training needs -o data PATH")
        if raw.manifest.get("encoding") != ENCODING:
            raise InputError(
                f"{raw.label} is not a sketch; make one with `compress apply --plugin sketchtune`"
            )
        sketch = DecodedSketch(raw)
        rows = read_examples(opts["data"])
        objective = objective_for(rows, opts["objective"])
        torch.manual_seed(opts["seed"])
        losses: list[float] = []
        with source_model(sketch, "saved", job.device) as (net, tokenizer):
            check_head(net, objective, raw.label)
            task = Task(objective, net.config, tokenizer, opts["max_length"], job.device)
            split = task.split(rows, opts["data"], opts["batch_size"])
            tables = swap_in_sketches(net, sketch)
            trainer = Trainer(list(tables.values()), lr=opts["lr"], weight_decay=0.0, clip=1.0)
            net.train()
            picks = row_batches(len(rows), opts["batch_size"], opts["steps"], opts["seed"])
            bar = job.progress(picks, desc="sketchtune", unit="step", total=opts["steps"])
            for pick in bar:
                x, y = task.batch(split, pick)

                def piece(x=x, y=y):
                    total, n = task.loss(net(**x).logits, x, y)
                    return total / max(n, 1), 1

                loss, _ = trainer.step([piece])
                losses.append(loss)
                show_loss(bar, loss=loss)
        for name, table in tables.items():
            job.writer.write(f"{module_of(name)}.sketch", table.detach().float().cpu())
        window = max(1, len(losses) // 10)
        trainable = sum(t.numel() for t in tables.values())
        return Manifest(
            "model",
            metrics={
                "steps": opts["steps"],
                "trainable_parameters": trainable,
                "loss_first": sum(losses[:window]) / window,
                "loss_last": sum(losses[-window:]) / window,
            },
            extra={
                "encoding": ENCODING,
                "tuned": True,
                "objective": objective,
                "summary": [
                    f"{trainable} table entries tuned over {opts['steps']} steps ({objective}); "
                    "codes and every other tensor are the sketch's"
                ],
            },
        )
