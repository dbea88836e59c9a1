"""Model cards: the README.md of every folder mora-train writes for others to load, in the Hugging Face Hub's format
(YAML metadata the Hub indexes, then a Markdown body; huggingface_hub's ModelCard parses both).

One call writes one: `write_model_card(folder, facts, kind)`, where `kind` says what the folder holds —

    merged   the adapter merged into the base: a plain transformers checkpoint (RUN_DIR/merged)
    adapter  the trained adapter in its own format, re-attached to the base (RUN_DIR/adapter)
    lora     a PEFT LoRA folder (`mora-train-export`), for peft, vLLM and SGLang
    gguf     a llama.cpp GGUF file (+ Ollama Modelfile)

and `facts` (CardFacts) what the card says: the method, its layers, the training, the final metrics and the checks.
A training run writes its facts beside its outputs (RUN_DIR/card_facts.json, `read_card_facts`), so an export
made later says the same about the run and adds its own (`CardFacts.lora`, `CardFacts.gguf`). The body's text is
export/card_text.py.

Commands in a card name the folder as FOLDER_PLACEHOLDER; `mora-train-push` puts the Hub repo id there
(`card_for_repo`), so a card reads right both on disk and on the Hub.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_json_atomically, write_text_atomically
from mora_train.core.run_dir import RunDir

# The kinds of folder a card describes (the merged and adapter folders of a run dir keep their RunDir names).
MERGED, ADAPTER, LORA, GGUF = RunDir.MERGED, RunDir.ADAPTER, "lora", "gguf"
CARD_KINDS = (MERGED, ADAPTER, LORA, GGUF)
FOLDER_PLACEHOLDER = "path/to/this/folder"
# What loads each kind (the Hub's `library_name`); a native adapter folder that peft wrote itself is peft's.
LIBRARY = {MERGED: "transformers", ADAPTER: "mora-train", LORA: "peft", GGUF: "transformers"}
# How each kind derives from its base model (the Hub's `base_model_relation`).
RELATION = {MERGED: "finetune", ADAPTER: "adapter", LORA: "adapter", GGUF: "finetune"}
KIND_TAGS: dict[str, list[str]] = {
    MERGED: [],
    ADAPTER: [],
    LORA: ["lora", "peft"],
    GGUF: ["gguf", "llama.cpp", "ollama"],
}
FACTS_VERSION = 1


@dataclass
class LayerShape:
    """The adapted layers of one kind and shape, as the run's summary shows them."""

    kind: str  # the layer's own name, e.g. q_proj
    d_out: int
    d_in: int
    size: str  # what the method trains per layer: r=8 (LoRA), r̂=96 (MoRA's square matrix), full
    layers: int  # how many layers of this kind and shape
    params_per_layer: int


@dataclass
class MergeCheck:
    """The merge check of the run (export/merge.py): merged/ reloaded by plain transformers against the trained
    model's logits on a fixed batch, with the tolerance of export/checks.py."""

    max_abs_diff: float
    tolerance: float
    passed: bool
    dtype: str | None = None  # the merged checkpoint's dtype
    before_cast_max_abs_diff: float | None = None  # a checkpoint coarser than the trained dtype only
    before_cast_tolerance: float | None = None
    kernel_max_abs_diff: float | None = None  # a 4-/8-bit base only: de-quantized weights against its kernels
    kernel_tolerance: float | None = None


@dataclass
class Training:
    task: str
    steps: int | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    max_seq_len: int | None = None
    precision: str | None = None
    seed: int | None = None
    train_loss: float | None = None
    runtime_s: float | None = None


@dataclass
class LoraExport:
    """A PEFT LoRA export (`mora-train-export`): how exact it is and what checked it."""

    rank: int  # the largest rank of any layer (the folder's `r`)
    truncated: bool  # --rank / --energy dropped singular directions (else exact to float32 rounding)
    max_relative_error: float  # max over layers of ||ΔW - B A||_F / ||ΔW||_F
    mean_relative_error: float
    peft_max_abs_logit_diff: float | None = None  # plain peft's logits against the trained model's (None: unchecked)
    per_layer_ranks: bool = False  # rank_pattern: each layer keeps its own rank instead of one padded rank
    dtype: str | None = None  # the exported weights' dtype
    how: str | None = None  # where the factors came from, in words
    metric: str | None = None  # the task's primary metric, when the export was evaluated (--evaluate)
    metric_trained: float | None = None  # ... of the trained model
    metric_exported: float | None = None  # ... of the base with this export merged


@dataclass
class GgufExport:
    """A GGUF export: the file, its tensor type and what checked it."""

    file: str  # the .gguf file's name in the folder
    outtype: str  # f32, f16, bf16, q8_0
    modelfile: str | None = None  # the Ollama Modelfile's name in the folder
    max_abs_logit_diff: float | None = None  # transformers' GGUF reader against the merged model (None: unchecked)


@dataclass
class CardFacts:
    """What a model card says. Built from the live run at its end (pipeline/cards.py), stored as
    RUN_DIR/card_facts.json (`to_json` / `from_json`); exports add `lora` or `gguf`."""

    name: str  # a short name for the model, e.g. SmolLM2-135M-Instruct-mora-uuid
    method: str  # the adapter's name (adapter.name): mora, lora, full, ...
    title: str  # the adapter's one-line title, e.g. `mora (rank 8, type rope)`
    base_model: str | None = None  # the base's Hub id (models.hub.base_model_id); None: none known
    base_model_note: str | None = None  # how the weights trained on differ from base_model's
    base_description: str | None = None  # the base in words when it has no Hub id (a random model, a folder)
    settings: dict[str, Any] = field(default_factory=dict)  # the method's settings (Adapter.describe())
    layers: list[LayerShape] = field(default_factory=list)
    trainable_params: int | None = None
    total_params: int | None = None
    training: Training | None = None
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids the run trained or evaluated on
    eval_dataset: str | None = None  # the Hub dataset the metrics were measured on, when known
    metrics: dict[str, float] = field(default_factory=dict)  # the final scores (timings and counts left out)
    primary_metric: str | None = None
    greater_is_better: bool = True
    merge: MergeCheck | None = None
    adapter_library: str = "mora-train"  # who reads RUN_DIR/adapter: mora-train, or peft where peft wrote it
    lora: LoraExport | None = None
    gguf: GgufExport | None = None

    def to_json(self) -> dict[str, Any]:
        return {"version": FACTS_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CardFacts:
        values = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
        nested = {"training": Training, "merge": MergeCheck, "lora": LoraExport, "gguf": GgufExport}
        for key, kind in nested.items():
            if values.get(key) is not None:
                values[key] = kind(**values[key])
        values["layers"] = [LayerShape(**row) for row in values.get("layers") or []]
        return cls(**values)


def check_kind(kind: str) -> str:
    if kind not in CARD_KINDS:
        raise MoraTrainError(f"model card kind {kind!r} is unknown; use one of {', '.join(CARD_KINDS)}")
    return kind


def card_data(facts: CardFacts, kind: str) -> Any:
    """The card's Hub metadata (huggingface_hub.ModelCardData): base model, library, pipeline tag, tags, datasets,
    and the final metrics as a model-index."""
    from huggingface_hub import EvalResult, ModelCardData

    kind = check_kind(kind)
    library = facts.adapter_library if kind == ADAPTER else LIBRARY[kind]
    tags = list(dict.fromkeys(["mora-train", facts.method, *KIND_TAGS[kind]]))
    task = facts.training.task if facts.training else facts.method
    dataset = facts.eval_dataset or task
    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=dataset,
            dataset_name=task,
            metric_type=name,
            metric_value=value,
        )
        for name, value in facts.metrics.items()
    ]
    extra: dict[str, Any] = {"base_model_relation": RELATION[kind]} if facts.base_model else {}
    return ModelCardData(
        base_model=facts.base_model,
        library_name=library,
        pipeline_tag="text-generation",
        tags=tags,
        datasets=facts.datasets or None,
        model_name=facts.name,
        eval_results=results or None,
        **extra,
    )


def model_card_text(facts: CardFacts, kind: str) -> str:
    """The whole README.md: metadata block, then the body (export/card_text.py)."""
    from huggingface_hub import ModelCard

    from mora_train.export.card_text import card_body

    data = card_data(facts, kind)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(facts, check_kind(kind))}"))


def write_model_card(folder: Path, facts: CardFacts, kind: str) -> Path:
    """Write FOLDER/README.md (atomically) for a folder of `kind` (merged | adapter | lora | gguf); return its path.
    Replaces a README.md already there (peft writes a template card into the LoRA folders it saves)."""
    path = Path(folder) / RunDir.MODEL_CARD
    write_text_atomically(path, model_card_text(facts, kind))
    return path


def card_for_repo(text: str, repo_id: str) -> str:
    """A card's text with its folder placeholder replaced by the Hub repo it is pushed to."""
    return text.replace(FOLDER_PLACEHOLDER, repo_id)


def write_card_facts(run_dir: Path, facts: CardFacts) -> None:
    write_json_atomically(RunDir(run_dir).card_facts, facts.to_json())


def read_card_facts(run_dir: Path) -> CardFacts | None:
    """The facts a finished run recorded for its cards (RUN_DIR/card_facts.json); None for runs from before cards
    and for folders that are not run dirs."""
    path = RunDir(run_dir).card_facts
    if not path.is_file():
        return None
    try:
        return CardFacts.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:
        raise MoraTrainError(
            f"{path} is unreadable ({type(err).__name__}: {err}); it is rewritten by the run that made it — rerun "
            "that run, or delete the file to write cards without the run's details"
        ) from None
