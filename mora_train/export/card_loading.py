"""A model card's "How to load it" section, one per kind of folder: plain transformers for a merged checkpoint, peft
or mora-train for an adapter, peft, vLLM and SGLang for a LoRA export, llama.cpp, Ollama and transformers for GGUF.

`here` names the folder (export/card.FOLDER_PLACEHOLDER, which `mora-train-push` replaces by the Hub repo id), so
every command reads right on disk and on the Hub; `base` is the base model's Hub id, or a placeholder."""

from __future__ import annotations

from mora_train.export.card import ADAPTER, GGUF, LORA, MERGED, CardFacts


def loading_section(facts: CardFacts, kind: str, base: str, here: str) -> str:
    where = f"Below, `{here}` stands for where this model is: its folder, or its Hub repo id."
    if not facts.base_model and kind in (ADAPTER, LORA):
        where += (
            f" `{base}` stands for the base model it was trained on, loaded the way the run loaded it: "
            f"{facts.base_description or 'a model that is not on the Hub'}."
        )
    body = {
        MERGED: _merged,
        ADAPTER: _adapter,
        LORA: _lora,
        GGUF: _gguf,
    }[kind](facts, base, here)
    return f"## How to load it\n\n{where}\n\n{body}"


def _python(code: str) -> str:
    return f"```python\n{code.strip()}\n```"


def _bash(code: str) -> str:
    return f"```bash\n{code.strip()}\n```"


def _merged(facts: CardFacts, base: str, here: str) -> str:
    code = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{here}")
tokenizer = AutoTokenizer.from_pretrained("{here}")
"""
    return (
        f"Plain transformers, no mora-train needed:\n\n{_python(code)}\n\n"
        f"Any engine that serves transformers checkpoints serves it as it is:\n\n{_bash(f'vllm serve {here}')}"
    )


def _peft_code(base: str, here: str) -> str:
    return f"""
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
tokenizer = AutoTokenizer.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{here}")
merged = model.merge_and_unload()  # a plain transformers model
"""


def _adapter(facts: CardFacts, base: str, here: str) -> str:
    if facts.adapter_library == "peft":
        return f"With peft on the base model:\n\n{_python(_peft_code(base, here))}"
    code = f"""
import os

from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM
from mora_train import load_adapter  # pip install mora-train

folder = "{here}"
folder = folder if os.path.isdir(folder) else snapshot_download(folder)  # a Hub repo id: download it first
adapted = load_adapter(AutoModelForCausalLM.from_pretrained("{base}"), folder)
model = adapted.model  # the adapted model: forward, generate, train on
merged = adapted.merge_and_unload()  # a plain transformers model
"""
    return (
        f"mora-train's loader attaches it to the base model:\n\n{_python(code)}\n\n"
        "Serving engines know LoRA, not this format: `mora-train-export RUN_DIR OUT_DIR` writes the adapter as a "
        "PEFT LoRA folder (exact for LoRA and MoRA) that peft, vLLM and SGLang load."
    )


def _lora(facts: CardFacts, base: str, here: str) -> str:
    name = facts.method
    rank_flag = ""
    too_wide = ""
    if facts.lora is not None:
        from mora_train.export.lora import vllm_max_lora_rank

        serve = vllm_max_lora_rank(facts.lora.rank)
        rank_flag = f" --max-lora-rank {serve}" if serve is not None else ""
        if serve is None:
            too_wide = (
                f"\n\nIts rank {facts.lora.rank} is above vLLM's largest `--max-lora-rank` (512): vLLM refuses it, "
                "peft loads it; export again with `--rank` or `--energy` to serve it with vLLM."
            )
    engines = f"""
vllm serve {base} --enable-lora{rank_flag} --lora-modules {name}={here}
python -m sglang.launch_server --model-path {base} --lora-paths {name}={here}{rank_flag}
"""
    return (
        f"With peft:\n\n{_python(_peft_code(base, here))}\n\n"
        f'With vLLM or SGLang (then request `"model": "{name}"`):\n\n{_bash(engines)}{too_wide}'
    )


def _gguf(facts: CardFacts, base: str, here: str) -> str:
    file = facts.gguf.file if facts.gguf else "MODEL.gguf"
    modelfile = facts.gguf.modelfile if facts.gguf and facts.gguf.modelfile else None
    name = f"{facts.method}-model"
    ollama = f"\nollama create {name} -f {modelfile} && ollama run {name}" if modelfile else ""
    shell = f"""
# in this folder (from the Hub: hf download {here} --local-dir model && cd model)
llama-cli -m {file} -p "Hello"
llama-server -m {file}  # an OpenAI-compatible server on port 8080{ollama}
"""
    code = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{here}", gguf_file="{file}")
tokenizer = AutoTokenizer.from_pretrained("{here}", gguf_file="{file}")
"""
    return f"llama.cpp and Ollama:\n\n{_bash(shell)}\n\ntransformers (de-quantizes it to float):\n\n{_python(code)}"
