"""The Markdown body of a model card (export/card.py writes it below the Hub metadata): what the model is, how it was
trained and scored, what checked it, how to load it, and the paper to cite."""

from __future__ import annotations

from collections.abc import Sequence

from mora_train.export.card import ADAPTER, GGUF, LORA, MERGED, CardFacts, GgufExport, LoraExport, MergeCheck
from mora_train.export.card import FOLDER_PLACEHOLDER as HERE
from mora_train.export.checks import FLOOR_FACTOR, MERGE_TOLERANCE, dtype_name

PAPER = "https://arxiv.org/abs/2405.12130"
BIBTEX = """@article{jiang2024mora,
  title   = {MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning},
  author  = {Jiang, Ting and Huang, Shaohan and Luo, Shengyue and Zhang, Zihan and Huang, Haizhen and Wei, Furu and
             Deng, Weiwei and Sun, Feng and Zhang, Qi and Wang, Deqing and Zhuang, Fuzhen},
  journal = {arXiv preprint arXiv:2405.12130},
  year    = {2024}
}"""
# Settings of Adapter.describe() that say nothing to a reader of the card (file-format bookkeeping).
HIDDEN_SETTINGS = ("format", "format_version", "adapter", "base_model", "modules")
BASE_PLACEHOLDER = "BASE_MODEL"
TIMES = "\N{MULTIPLICATION SIGN}"  # shapes and factors as the docs write them (576 by 576)


def card_body(facts: CardFacts, kind: str) -> str:
    parts = [
        _heading(facts, kind),
        _what_it_is(facts),
        _layers(facts),
        _training(facts),
        _results(facts),
        _checks(facts, kind),
        _loading(facts, kind),
        _citation(),
    ]
    return "\n\n".join(part for part in parts if part) + "\n"


def _citation() -> str:
    return (
        f"## Citation\n\nmora-train implements MoRA ([arXiv 2405.12130]({PAPER})); please cite the paper:\n\n"
        f"```bibtex\n{BIBTEX}\n```"
    )


def _base(facts: CardFacts) -> str:
    if facts.base_model:
        return f"[{facts.base_model}](https://huggingface.co/{facts.base_model})"
    return facts.base_description or "its base model"


def _heading(facts: CardFacts, kind: str) -> str:
    base = _base(facts)
    what = {
        MERGED: f"{base} fine-tuned with {facts.title} by mora-train, the update merged into the base weights: a "
        "plain transformers checkpoint that needs no adapter code.",
        ADAPTER: f"The {facts.title} adapter mora-train trained on {base}, in {facts.adapter_library}'s format: "
        "load the base model, then attach it.",
        LORA: f"The update of {facts.title} that mora-train trained on {base}, as a standard PEFT LoRA adapter "
        "for peft, vLLM and SGLang.",
        GGUF: f"{base} fine-tuned with {facts.title} by mora-train, merged and written as a llama.cpp GGUF file "
        "for llama.cpp and Ollama.",
    }[kind]
    lines = [f"# {facts.name}", what[:1].upper() + what[1:]]
    if facts.base_model_note:
        lines.append(f"**Base weights.** {facts.base_model_note}")
    return "\n\n".join(lines)


def _what_it_is(facts: CardFacts) -> str:
    rows = [("method", facts.title), ("base model", _base(facts))]
    if facts.trainable_params is not None and facts.total_params:
        share = 100.0 * facts.trainable_params / facts.total_params
        rows.append(("trainable parameters", f"{facts.trainable_params:,} of {facts.total_params:,} ({share:.3f}%)"))
    for key, value in facts.settings.items():
        if key in HIDDEN_SETTINGS or value in (None, "", {}, []) or isinstance(value, dict):
            continue
        shown = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
        rows.append((f"`{key}`", shown))
    return "## What it is\n\n" + _table(("", ""), rows)


def _layers(facts: CardFacts) -> str:
    if not facts.layers:
        return ""
    rows = [
        (f"`{s.kind}`", f"{s.d_out} {TIMES} {s.d_in}", s.size, str(s.layers), f"{s.params_per_layer:,}")
        for s in facts.layers
    ]
    header = ("layer", f"shape (out {TIMES} in)", "trained per layer", "layers", "parameters per layer")
    return "### Adapted layers\n\n" + _table(header, rows)


def _training(facts: CardFacts) -> str:
    t = facts.training
    if t is None:
        return ""
    said = [f"task `{t.task}`"]
    said += [f"{t.steps} steps"] if t.steps is not None else []
    said += [f"learning rate {t.learning_rate:g}"] if t.learning_rate is not None else []
    said += [f"batch size {t.batch_size}"] if t.batch_size is not None else []
    said += [f"max_seq_len {t.max_seq_len}"] if t.max_seq_len is not None else []
    said += [f"precision {t.precision}"] if t.precision else []
    said += [f"seed {t.seed}"] if t.seed is not None else []
    text = "## Training\n\nTrained by mora-train on " + ", ".join(said) + "."
    if t.train_loss is not None:
        text += f" Final training loss {t.train_loss:.4f}"
        text += f" ({t.runtime_s:.0f} s of training)." if t.runtime_s is not None else "."
    if facts.datasets:
        text += " Data: " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in facts.datasets) + "."
    return text


def _results(facts: CardFacts) -> str:
    if not facts.metrics:
        return ""
    direction = "higher" if facts.greater_is_better else "lower"
    rows = [
        (f"`{name}`" + (f" (primary, {direction} is better)" if name == facts.primary_metric else ""), f"{value:.4f}")
        for name, value in facts.metrics.items()
    ]
    where = f" on task `{facts.training.task}`" if facts.training else ""
    return f"## Results\n\nThe task's own evaluation{where}, after training:\n\n" + _table(("metric", "value"), rows)


def _checks(facts: CardFacts, kind: str) -> str:
    said = [_merge_check(facts.merge, kind)] if facts.merge else []
    if kind == LORA and facts.lora:
        said.append(_lora_check(facts.lora))
    if kind == GGUF and facts.gguf:
        said.append(_gguf_check(facts.gguf))
    return "## Checks\n\n" + "\n\n".join(said) if said else ""


def _merge_check(merge: MergeCheck, kind: str) -> str:
    subject = "This checkpoint" if kind == MERGED else "The run's merged checkpoint"
    outcome = "passed" if merge.passed else "FAILED"
    dtype = f" ({merge.dtype})" if merge.dtype else ""
    text = (
        f"**Merge check: {outcome}.** {subject}{dtype}, reloaded by plain transformers, was compared with the trained "
        f"(adapted) model on a fixed batch: max |logit difference| {merge.max_abs_diff:.3g}, tolerance "
        f"{merge.tolerance:.3g} ({FLOOR_FACTOR:g} {TIMES} the model's measured float rounding floor, never below "
        + ", ".join(f"{floor:g} for {dtype_name(dtype)}" for dtype, floor in MERGE_TOLERANCE.items())
        + ")."
    )
    if merge.before_cast_max_abs_diff is not None and merge.before_cast_tolerance is not None:
        text += (
            f" Before its cast to the checkpoint's coarser dtype the merged model was checked too: "
            f"{merge.before_cast_max_abs_diff:.3g}, tolerance {merge.before_cast_tolerance:.3g}."
        )
    if merge.kernel_max_abs_diff is not None and merge.kernel_tolerance is not None:
        text += (
            " The base was 4-/8-bit: its de-quantized weights computed what its quantized kernels computed within "
            f"{merge.kernel_max_abs_diff:.3g} (tolerance {merge.kernel_tolerance:.3g})."
        )
    if not merge.passed:
        text += " The merged checkpoint did not reproduce the trained model; the adapter is intact."
    return text


def _lora_check(lora: LoraExport) -> str:
    if lora.truncated:
        text = (
            f"**Truncated export.** Each layer keeps the top singular directions of its trained update ΔW (rank at "
            f"most {lora.rank}): relative Frobenius error of ΔW max {lora.max_relative_error:.3g}, mean "
            f"{lora.mean_relative_error:.3g}. It approximates the trained model; it is not the trained model."
        )
    else:
        text = (
            f"**Exact export.** Its LoRA factors reproduce each layer's trained update ΔW to float32 rounding "
            f"(relative Frobenius error max {lora.max_relative_error:.3g}), at rank {lora.rank}."
        )
    text += (
        " Each layer has its own rank (`rank_pattern`; vLLM and SGLang read it)."
        if lora.per_layer_ranks
        else " Every layer has the folder's one rank `r` (shorter ones zero-padded, which adds exactly 0)."
    )
    if lora.dtype:
        text += f" Weights in {lora.dtype}."
    if lora.metric and lora.metric_trained is not None and lora.metric_exported is not None:
        text += (
            f" The task's evaluation: `{lora.metric}` {lora.metric_trained:.4f} for the trained model, "
            f"{lora.metric_exported:.4f} for the base with this export merged."
        )
    if lora.peft_max_abs_logit_diff is not None:
        text += (
            " Loaded by plain peft in a process that never imported mora-train, it computed the trained model's "
            f"logits within max |difference| {lora.peft_max_abs_logit_diff:.3g}."
        )
    return text


def _gguf_check(gguf: GgufExport) -> str:
    text = f"**GGUF file** `{gguf.file}`, tensor type {gguf.outtype}."
    if gguf.max_abs_logit_diff is not None:
        text += (
            " Read back by transformers' GGUF loader, it computed the merged model's logits within max |difference| "
            f"{gguf.max_abs_logit_diff:.3g} (the rounding of {gguf.outtype})."
        )
    return text


def _loading(facts: CardFacts, kind: str) -> str:
    from mora_train.export.card_loading import loading_section

    return loading_section(facts, kind, facts.base_model or BASE_PLACEHOLDER, HERE)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)
