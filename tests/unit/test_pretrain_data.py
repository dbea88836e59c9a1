"""Continual pretraining: packing, no cross-document attention, perplexity, multiple-choice scoring, benchmark data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mora_train.config.schema import parse
from mora_train.core.errors import MoraTrainError
from mora_train.data.benchmarks import MCExample, load_benchmark
from mora_train.data.common import IGNORE_INDEX, PadCollator
from mora_train.data.corpus import pack_documents
from mora_train.evaluation.multiple_choice import score_choices
from mora_train.evaluation.perplexity import token_nll
from mora_train.models import load_model_and_tokenizer
from mora_train.pipeline.run_config import read_run_config
from mora_train.tasks import TASKS
from tests.conftest import compose_config


def finance(tmp_path: Path, *overrides: str):
    """The typed `task` section of task=finance with `overrides`, and every problem of the config."""
    run, problems = read_run_config(compose_config(["model=tiny-llama", "task=finance", *overrides], tmp_path))
    return run.task, problems


@pytest.fixture(scope="module")
def tiny():
    run, _ = read_run_config(compose_config(["model=tiny-llama"]))
    model, tokenizer = load_model_and_tokenizer(run.model)
    return model.eval(), tokenizer


def test_pack_documents_layout() -> None:
    docs = [[10, 11, 12, 2], [20, 21, 2], [30, 31, 32, 33, 34, 2]]  # each ends with EOS (2)
    blocks = pack_documents(docs, block_size=5)
    assert [b["input_ids"] for b in blocks] == [[10, 11, 12, 2, 20], [21, 2, 30, 31, 32], [33, 34, 2]]
    # Positions restart at each document start and at each block start.
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 2]]
    # A segment's first token is never a target: it would be predicted from the previous document.
    assert blocks[0]["labels"] == [IGNORE_INDEX, 11, 12, 2, IGNORE_INDEX]
    assert blocks[1]["labels"] == [IGNORE_INDEX, 2, IGNORE_INDEX, 31, 32]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_documents_do_not_attend_to_each_other(tiny, attention: str) -> None:
    model, _ = tiny
    model.set_attn_implementation(attention)
    docs = [[5, 6, 7, 8, 2], [9, 10, 11, 2], [12, 13, 2]]
    blocks = pack_documents(docs, block_size=12)
    batch = PadCollator(pad_token_id=0)(blocks)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        start = 0
        for doc in docs:
            alone = model(input_ids=torch.tensor([doc])).logits[0]
            torch.testing.assert_close(packed[start : start + len(doc)], alone, atol=1e-5, rtol=1e-5)
            start += len(doc)
    model.set_attn_implementation("sdpa")


def test_perplexity_of_packed_blocks_equals_per_document_loss(tiny) -> None:
    model, _ = tiny
    docs = [[5, 6, 7, 8, 2], [9, 10, 11, 2], [12, 13, 14, 15, 16, 2]]
    total, count = token_nll(model, pack_documents(docs, block_size=7), PadCollator(pad_token_id=0), batch_size=2)
    expected, expected_count = 0.0, 0
    with torch.no_grad():
        # Same blocks cut by hand: [5 6 7 8 2 | 9 10] [11 2 | 12 13 14 15 16] [2]
        for segment in ([5, 6, 7, 8, 2], [9, 10], [11, 2], [12, 13, 14, 15, 16]):
            logits = model(input_ids=torch.tensor([segment])).logits[0]
            expected += torch.nn.functional.cross_entropy(
                logits[:-1], torch.tensor(segment[1:]), reduction="sum"
            ).item()
            expected_count += len(segment) - 1
    assert count == expected_count
    assert total == pytest.approx(expected, rel=1e-5)


def brute_force_logprob(model, tokenizer, prompt: str, choice: str) -> float:
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].float(), -1)
    return sum(logprobs[len(p) - 1 + j, t].item() for j, t in enumerate(c))


def test_choice_scores_equal_a_brute_force_forward(tiny) -> None:
    model, tokenizer = tiny
    examples = [
        MCExample("Question: is it?\nAnswer:", [" yes", " no", " maybe"], 0, "x"),
        MCExample("Pick one:", [" A", " B"], 1, "y"),  # single-token choices: one shared forward
        MCExample("Longer", [" alpha beta", " gamma"], 1, "z"),
    ]
    scores, truncated = score_choices(model, tokenizer, examples, batch_size=2, max_len=512)
    assert truncated == 0
    for example, row in zip(examples, scores, strict=True):
        for choice, (total, n) in zip(example.choices, row, strict=True):
            assert n == len(tokenizer(choice, add_special_tokens=False)["input_ids"])
            assert total == pytest.approx(brute_force_logprob(model, tokenizer, example.prompt, choice), abs=1e-4)


def test_long_prompts_lose_their_start(tiny) -> None:
    model, tokenizer = tiny
    example = MCExample("x" * 100 + " tail:", [" yes", " no"], 0, "w")
    scores, truncated = score_choices(model, tokenizer, [example], batch_size=2, max_len=40)
    assert truncated == 1
    kept = "x" * (40 - 3) + " tail:"  # byte tokens: the prompt keeps its last 40 - (len(" yes") - 1) bytes
    assert scores[0][0][0] == pytest.approx(brute_force_logprob(model, tokenizer, kept[-37:], " yes"), abs=1e-4)


def benchmark_cfg(tmp_path: Path, rows: list[dict], *overrides: str):
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings, problems = finance(tmp_path, f"task.benchmarks.twitter_sentiment.data.path={path}", *overrides)
    assert problems == []
    return settings.benchmarks["twitter_sentiment"]


def test_benchmark_records_render_prompts_and_labels(tmp_path: Path) -> None:
    bench = benchmark_cfg(tmp_path, [{"text": "$TSLA soars", "label": 1}, {"text": "$X falls", "label": 0}])
    examples = load_benchmark(bench, "task.benchmarks.twitter_sentiment")
    assert (
        examples[0].prompt
        == "Tweet: $TSLA soars\nQuestion: Is this financial news tweet bearish, bullish or neutral?\nAnswer:"
    )
    assert examples[0].choices == [" bearish", " bullish", " neutral"]
    assert [e.gold for e in examples] == [1, 0]


def test_benchmark_max_samples_is_a_prefix_or_a_seeded_sample(tmp_path: Path) -> None:
    # A file grouped by label, as FinancialPhraseBank is: 30 bearish tweets, then 30 bullish.
    rows = [{"text": f"t{i}", "label": 0 if i < 30 else 1} for i in range(60)]
    prefix = load_benchmark(benchmark_cfg(tmp_path, rows, "task.benchmarks.twitter_sentiment.max_samples=20"), "k")
    assert [e.prompt.split("\n")[0] for e in prefix] == [f"Tweet: t{i}" for i in range(20)]
    sampled = load_benchmark(
        benchmark_cfg(
            tmp_path,
            rows,
            "task.benchmarks.twitter_sentiment.max_samples=20",
            "+task.benchmarks.twitter_sentiment.sample_seed=0",
        ),
        "k",
    )
    order = [int(e.prompt.split("\n")[0].removeprefix("Tweet: t")) for e in sampled]
    assert len(set(order)) == 20 and order == sorted(order)  # distinct records, file order kept
    assert 0 < sum(e.gold for e in sampled) < 20  # both labels, unlike the prefix
    again = load_benchmark(
        benchmark_cfg(
            tmp_path,
            rows,
            "task.benchmarks.twitter_sentiment.max_samples=20",
            "+task.benchmarks.twitter_sentiment.sample_seed=0",
        ),
        "k",
    )
    assert [e.where for e in again] == [e.where for e in sampled]  # the seed fixes the sample
    _, problems = finance(tmp_path, "task.benchmarks.financial_phrasebank.sample_seed=yes")
    assert "`task.benchmarks.financial_phrasebank.sample_seed` must be int or null, got 'yes'" in problems


def test_benchmark_data_errors(tmp_path: Path) -> None:
    with pytest.raises(MoraTrainError, match=r"bench\.jsonl line 2: label '7' .* is not one of"):
        load_benchmark(benchmark_cfg(tmp_path, [{"text": "a", "label": 1}, {"text": "b", "label": 7}]), "k")
    with pytest.raises(MoraTrainError, match=r"bench\.jsonl line 1: field 'text' is missing.*fields: tweet, label"):
        load_benchmark(benchmark_cfg(tmp_path, [{"tweet": "a", "label": 1}]), "k")
    _, found = finance(
        tmp_path, "task.benchmarks.gold_headline.labels=[1]", "task.eval.benchmarks=[gold_headline,nope]"
    )
    problems = "\n".join(found)
    assert "one label per choice" in problems and "`task.eval.benchmarks` names 'nope'" in problems


def test_only_selected_benchmarks_need_their_data(tmp_path: Path) -> None:
    # Without data_dir, FinancialPhraseBank has no source (its Hub copy is a loading script): not run, not checked.
    settings, problems = finance(tmp_path, "data_dir=null")
    assert problems == [] and settings.benchmarks["financial_phrasebank"].data.path is None
    _, problems = finance(tmp_path, "data_dir=null", "task.eval.benchmarks=[financial_phrasebank]")
    assert any("`task.benchmarks.financial_phrasebank.data` needs exactly one of `path`" in p for p in problems)


def test_pretrain_build_reads_templates_filters_and_caches(tmp_path: Path, tiny) -> None:
    _, tokenizer = tiny
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"pmid": i, "title": f"T{i}", "abstract": "a b c"}) + "\n" for i in range(4))
    )
    (tmp_path / "ids.txt").write_text("1\n2\n")
    (tmp_path / "more.txt").write_text("free text document")
    (tmp_path / "bench.jsonl").write_text(json.dumps({"text": "t", "label": 2}) + "\n")
    settings, problems = finance(
        tmp_path,
        f"task.data.eval={tmp_path / 'more.txt'}",
        f"task.cache_dir={tmp_path / 'cache'}",
        "task.eval.benchmarks=[twitter_sentiment]",
        f"task.benchmarks.twitter_sentiment.data.path={tmp_path / 'bench.jsonl'}",
    )
    assert problems == []
    # A list of sources, each with its own field mapping and filter (a list cannot replace a mapping on the command
    # line): parsed from the plain values, as RunConfig parses the composed config.
    values = settings.to_dict()
    values["data"]["train"] = [
        {
            "path": str(tmp_path / "docs.jsonl"),
            "fields": {"text": "{title}: {abstract}"},
            "drop_if_in": {"field": "pmid", "file": str(tmp_path / "ids.txt")},
        },
        str(tmp_path / "more.txt"),
    ]
    cfg = parse(TASKS["finance"].settings, values, "task", problems)
    assert problems == []
    data = TASKS["finance"].build(cfg, tokenizer, 16)
    text = tokenizer.decode([t for b in data.train for t in b["input_ids"]])
    assert text == "T0: a b c</s>T3: a b c</s>free text document</s>"  # pmid 1 and 2 dropped
    assert all(len(b["input_ids"]) == 16 for b in data.train[:-1])
    assert list(data.benchmarks) == ["twitter_sentiment"] and data.stats["cache"] == "miss"
    assert TASKS["finance"].build(cfg, tokenizer, 16).stats["cache"] == "hit"
    assert math.isfinite(token_nll(tiny[0], data.eval_blocks, PadCollator(0))[0])
