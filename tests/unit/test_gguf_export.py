"""`mora-train-export --format gguf`: a merged model as a llama.cpp GGUF file, read back by transformers' own GGUF
loader (and by llama.cpp where llama-cpp-python is installed) with the merged model's logits and tokenization."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from mora_train.core.errors import MoraTrainError
from mora_train.export import gguf as gguf_export
from mora_train.export.gguf import OUTTYPES, rotate_pairs_permutation, tensor_type
from mora_train.export.gguf_vocab import PRE_TOKENIZERS, PROBE_TEXT, byte_level_pre_tokenizer
from mora_train.models import byte_tokenizer
from mora_train.pipeline.gguf_export import export_gguf

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def _model_folder(folder: Path, architecture: str, tokenizer=None, **extra) -> Path:
    """A tiny random model of `architecture` saved with its tokenizer, as a run's merged/ is. transformers reads a
    Qwen2 folder's tokenizer as a Qwen2Tokenizer, whose own split and `<|endoftext|>` replace a byte tokenizer's:
    a Qwen2 model gets a BPE tokenizer that splits as Qwen2's does."""
    if tokenizer is None:
        tokenizer = _bpe_tokenizer(PRE_TOKENIZERS["qwen2"]()) if architecture == "qwen2" else byte_tokenizer()
    config = AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY, **extra},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # the zero-initialised biases would hide a misplaced bias
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("n_head, n_kv", [(4, 4), (4, 2), (9, 3)])
def test_rotate_pairs_is_undone_by_transformers_gguf_reader(n_head: int, n_kv: int) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    head_dim = 8
    for heads in (n_head, n_kv):  # the query projection has n_head heads, the key projection n_kv
        weight = torch.randn(heads * head_dim, 24)
        permuted = rotate_pairs_permutation(weight, heads).numpy()
        assert not np.array_equal(permuted, weight.numpy())
        restored = LlamaTensorProcessor()._reverse_permute_weights(permuted, n_head, heads)
        assert np.array_equal(restored, weight.numpy())


def test_vectors_stay_f32_and_q8_0_rows_not_a_multiple_of_32_fall_back_to_f16() -> None:
    assert {tensor_type((64,), outtype).name for outtype in OUTTYPES} == {"F32"}
    assert [tensor_type((128, 64), outtype).name for outtype in OUTTYPES] == ["F32", "F16", "BF16", "Q8_0"]
    assert tensor_type((128, 48), "q8_0").name == "F16"


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("outtype", OUTTYPES)
def test_transformers_reads_back_the_merged_model(architecture: str, outtype: str, tmp_path: Path) -> None:
    # qwen2 with its q/k/v biases and a tied LM head; llama with grouped-query attention and its own LM head
    tied = architecture == "qwen2"
    source = _model_folder(tmp_path / "merged", architecture, tie_word_embeddings=tied)
    report = export_gguf(source, tmp_path / "gguf", outtype)
    check = report["check"]
    # the file holds exactly the merged weights rounded as its type stores them
    assert check["passed"] and check["max_abs_diff"] <= 1e-9 and check["compared_in"] == "float64"
    assert check["tokenizer_matches"] is True
    if outtype == "f32":
        assert check["outtype_max_abs_diff"] == 0.0  # float32 weights are stored bit for bit
    else:  # rounding every matrix moves the logits, by less than a few % of their scale
        assert 0 < check["outtype_max_abs_diff"] < 0.05 * check["max_abs_logit"]
    written = json.loads((tmp_path / "gguf" / "gguf_export.json").read_text())
    assert written["check"]["passed"] and written["architecture"] == architecture
    file = tmp_path / "gguf" / f"model-{outtype}.gguf"
    assert file.stat().st_size == report["bytes"] and (tmp_path / "gguf" / "Modelfile").is_file()
    assert ("F32" in report["tensor_types"]) and (outtype == "f32") == (set(report["tensor_types"]) == {"F32"})
    import gguf

    names = {t.name for t in gguf.GGUFReader(file).tensors}
    assert ("output.weight" in names) != tied and "blk.1.attn_q.weight" in names
    assert ("blk.0.attn_q.bias" in names) == (architecture == "qwen2")


def test_file_sizes_follow_the_output_type(tmp_path: Path) -> None:
    source = _model_folder(tmp_path / "merged", "llama", intermediate_size=256)
    sizes = {outtype: export_gguf(source, tmp_path / outtype, outtype, check=False)["bytes"] for outtype in OUTTYPES}
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"]
    # Q8_0 stores 34 bytes per 32 weights, f16 64
    assert sizes["q8_0"] < 0.6 * sizes["f16"]


def test_a_file_with_the_wrong_head_order_fails_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _model_folder(tmp_path / "merged", "llama")
    monkeypatch.setattr(gguf_export, "rotate_pairs_permutation", lambda weight, n_head: weight)
    with pytest.raises(MoraTrainError, match="does not reproduce the merged model"):
        export_gguf(source, tmp_path / "gguf", "f32")
    kept = json.loads((tmp_path / "gguf" / "gguf_export.json").read_text())["check"]
    assert not kept["passed"] and kept["max_abs_diff"] > 10 * kept["tolerance"]


def _bpe_tokenizer(pre_tokenizer) -> PreTrainedTokenizerFast:
    """A small trained byte-level BPE tokenizer (real merges) splitting text with `pre_tokenizer`."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [PROBE_TEXT * 3, "the quick brown fox jumps over the lazy dog 12345 6789 it's we've " * 40]
    backend.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


@pytest.mark.parametrize("name", list(PRE_TOKENIZERS))
def test_the_pre_tokenizer_written_is_the_one_that_splits_like_the_model(name: str, tmp_path: Path) -> None:
    tokenizer = _bpe_tokenizer(PRE_TOKENIZERS[name]())
    assert byte_level_pre_tokenizer(tokenizer) == name
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    source = _model_folder(tmp_path / "merged", "llama", tokenizer)
    report = export_gguf(source, tmp_path / "gguf", "f16")
    assert report["tokenizer_pre"] == name and report["check"]["passed"]
    # transformers rebuilds every split but smollm's (it splits digits like gpt-2): not compared there
    assert report["check"]["tokenizer_matches"] is (None if name == "smollm" else True)
    read_back = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file="model-f16.gguf")
    assert read_back.chat_template == tokenizer.chat_template
    assert "\nTEMPLATE" not in (tmp_path / "gguf" / "Modelfile").read_text()  # Ollama takes the file's template


def test_a_tokenizer_no_llama_cpp_split_reproduces_is_refused(tmp_path: Path) -> None:
    tokenizer = _bpe_tokenizer(
        pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(use_regex=True)])
    )
    source = _model_folder(tmp_path / "merged", "llama", tokenizer)
    with pytest.raises(MoraTrainError, match=r"splits text like none of the llama\.cpp pre-tokenizers"):
        export_gguf(source, tmp_path / "gguf", "f32")
    assert not (tmp_path / "gguf").exists()


def test_unsupported_models_and_targets_are_refused_before_writing(tmp_path: Path) -> None:
    source = _model_folder(tmp_path / "merged", "llama", rope_parameters={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(MoraTrainError, match="'linear' RoPE scaling"):
        export_gguf(source, tmp_path / "out", "f32")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep me")
    with pytest.raises(MoraTrainError, match="already holds files not written by mora-train-export"):
        export_gguf(source, tmp_path / "theirs", "f32")
    with pytest.raises(MoraTrainError, match="neither a run dir with a merged model"):
        export_gguf(tmp_path / "theirs", tmp_path / "out", "f32")
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep me" and not (tmp_path / "out").exists()


def test_a_run_exports_through_the_command_and_again_into_its_own_folder(tmp_path: Path, capsys) -> None:
    from mora_train.cli.export import main
    from tests.conftest import TINY_RUN, compose_config, run_pipeline

    run_pipeline(compose_config([*TINY_RUN, "trainer.save_steps=0", "adapter=mora"], tmp_path / "run"))
    main([str(tmp_path / "run"), str(tmp_path / "gguf"), "--format", "gguf", "--outtype", "q8_0"])
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'gguf' / 'model-q8_0.gguf'}" in out and "max |logit difference| 0.00e+00" in out
    assert "FROM ./model-q8_0.gguf" in (tmp_path / "gguf" / "Modelfile").read_text()
    main([str(tmp_path / "run"), str(tmp_path / "gguf"), "--format", "gguf"])  # the merged model's dtype: f32
    files = sorted(p.name for p in (tmp_path / "gguf").iterdir())
    assert files == ["Modelfile", "README.md", "gguf_export.json", "model-f32.gguf"]
    report = json.loads((tmp_path / "gguf" / "gguf_export.json").read_text())
    assert report["outtype"] == "f32" and report["check"]["outtype_max_abs_diff"] == 0.0
    # The run's model card, for llama.cpp / Ollama users: the file, its tensor type and how to run it.
    card = ModelCard.load(tmp_path / "gguf" / "README.md")
    assert "gguf" in card.data.tags and "model-f32.gguf" in card.text and "ollama create" in card.text.lower()


def test_cli_options_of_the_other_format_are_refused(capsys: pytest.CaptureFixture) -> None:
    from mora_train.cli.export import main

    for args, message in (
        (["run", "out", "--format", "gguf", "--rank", "8"], "--rank applies to --format lora only"),
        (["run", "out", "--format", "gguf", "--energy", "0.9"], "--energy applies to --format lora only"),
        (["run", "out", "--outtype", "q8_0"], "--outtype applies to --format gguf only"),
        (["run", "out", "--format", "gguf", "--outtype", "q4_0"], "invalid choice: 'q4_0'"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install llama-cpp-python; it builds llama.cpp)",
)
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_llama_cpp_loads_the_file_and_computes_the_merged_logits(outtype: str, tmp_path: Path) -> None:
    import llama_cpp

    tokenizer = _bpe_tokenizer(PRE_TOKENIZERS["gpt-2"]())
    source = _model_folder(tmp_path / "merged", "llama", tokenizer)
    export_gguf(source, tmp_path / "gguf", outtype)
    llm = llama_cpp.Llama(str(tmp_path / "gguf" / f"model-{outtype}.gguf"), logits_all=True, verbose=False)
    ids = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    assert llm.tokenize(PROBE_TEXT.encode(), add_bos=False, special=False) == ids
    llm.eval(ids[:32])
    got = torch.tensor(np.array(llm.scores[:32]))
    merged = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = merged(input_ids=torch.tensor([ids[:32]])).logits[0]
    # llama.cpp computes in float32 with its own kernels (q8_0: activations quantized to 8 bits too)
    tolerance = (1e-3 if outtype == "f32" else 5e-2) * float(expected.abs().max())
    assert float((got - expected).abs().max()) <= tolerance
