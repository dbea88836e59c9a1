"""LoRA through peft, behind the same Adapter protocol as MoRA: plain LoRA and its family (rsLoRA scaling, DoRA,
PiSSA / OLoRA initialisation), each one LoraSettings key; the layers are lora/layer.py's, the saving of
PiSSA / OLoRA adapters lora/residual.py's."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters.base import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    Adapter,
    find_target_linears,
    positive_rank,
    settings_as,
)
from mora_train.adapters.capabilities import HasLoraFactors, Restartable, TrainsFactorPair
from mora_train.adapters.config import AdapterSettings, TrainerView
from mora_train.adapters.lora.config import LoraSettings, is_residual_init
from mora_train.adapters.lora.layer import PEFT_ADAPTER, RESTARTABLE_INITS, PeftLoraLayer, PeftLoraLinear
from mora_train.adapters.lora.residual import convert_saved_folder, trained_part
from mora_train.core.errors import MoraTrainError

if TYPE_CHECKING:
    from torch.nn.modules.module import _IncompatibleKeys

log = logging.getLogger(__name__)


class LoraAdapter(Restartable, TrainsFactorPair, HasLoraFactors, Adapter):
    settings_type = LoraSettings
    name = "lora"

    # -- before a model exists --------------------------------------------------------------------------

    @classmethod
    def config_problems(cls, settings: AdapterSettings, rank: int | None, trainer: TrainerView) -> list[str]:
        """Restarts with an init they cannot draw again; orthogonal init at an odd rank."""
        lora = settings_as(LoraSettings, settings)
        problems = super().config_problems(settings, rank, trainer)
        if trainer.restart.every_steps > 0 and lora.init not in RESTARTABLE_INITS:
            problems.append(
                f"`adapter.init={lora.init}` with `trainer.restart.every_steps={trainer.restart.every_steps}` "
                "(ReLoRA): a restart starts the adapter again from ΔW = 0 with A random and B zero, which "
                f"{lora.init} is not ({'it derives A and B from W' if is_residual_init(lora.init) else 'B A != 0'}); "
                f"use adapter.init={' or '.join(RESTARTABLE_INITS)} with restarts, or trainer.restart.every_steps=0"
            )
        if lora.init == "orthogonal" and isinstance(rank, int) and rank % 2:
            problems.append(f"`adapter.init=orthogonal` needs an even rank (peft pairs A's rows); got rank={rank}")
        return problems

    @classmethod
    def quantized_base_problem(cls, settings: AdapterSettings, quantization: str) -> str | None:
        lora = settings_as(LoraSettings, settings)
        if lora.use_dora and quantization == "int8" and not torch.cuda.is_available():
            return (
                "DoRA on an 8-bit base without a GPU: peft's DoRA de-quantizes the 8-bit weight at every forward and "
                "on the CPU puts back a copy without bitsandbytes' row scales, so the next forward fails (peft 0.21, "
                "bitsandbytes 0.50); use model.quantization=nf4 or fp4 with DoRA, or adapter.use_dora=false"
            )
        if is_residual_init(lora.init):
            return (
                f"adapter.init={lora.init} replaces each base weight W by W - s B0 A0, which on a 4-/8-bit base "
                "would be re-quantized (peft refuses PiSSA there), and the saved LoRA would no longer reproduce "
                "the trained model on the original quantized weights; use adapter.init=default or gaussian on a "
                "quantized base, or model.quantization=none"
            )
        return None

    @classmethod
    def layer_problems(cls, layers: dict[str, nn.Linear], settings: AdapterSettings, rank: int) -> list[str]:
        capped = sorted({n.rsplit(".", 1)[-1] for n, m in layers.items() if rank > min(m.in_features, m.out_features)})
        lora = settings_as(LoraSettings, settings)
        if capped and is_residual_init(lora.init):
            return [
                (
                    f"`adapter.init={lora.init}` takes {rank} directions of each W, but {capped} have fewer "
                    f"(min(d_in, d_out) < rank={rank}); lower rank or leave those layers out of adapter.target_modules"
                )
            ]
        if capped:
            # Not an error (the paper compares LoRA and MoRA at r=256 on layers this narrow), but worth knowing.
            log.warning(
                "rank=%d exceeds min(d_in, d_out) of %s: LoRA's update there cannot reach that rank", rank, capped
            )
        return []

    @classmethod
    def trainable_count(
        cls, model: nn.Module, layers: dict[str, nn.Linear], settings: AdapterSettings, rank: int
    ) -> int:
        magnitudes = settings_as(LoraSettings, settings).use_dora  # DoRA: one m per output row
        return sum(rank * (m.in_features + m.out_features) + magnitudes * m.out_features for m in layers.values())

    @classmethod
    def build(
        cls,
        model: PreTrainedModel,
        settings: AdapterSettings,
        rank: int | None,
        load_base: Callable[[], nn.Module] | None = None,
    ) -> LoraAdapter:
        lora = settings_as(LoraSettings, settings)
        rank = positive_rank(rank)
        return cls(
            model,
            rank,
            lora.alpha_for(rank),
            lora.target_names,
            lora.dropout,
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,
            init=lora.init,
        )

    # -- a saved folder ------------------------------------------------------------------------------------

    @classmethod
    def reads(cls, config: dict[str, Any]) -> bool:
        """peft's LoRA folders (the official MoRA fork's are LoRA folders too, marked `use_mora`: MoRA reads those)."""
        return str(config.get("peft_type", "")).upper() == "LORA" and not config.get("use_mora")

    @classmethod
    def load(cls, model: PreTrainedModel, folder: Path, config: dict[str, Any]) -> LoraAdapter:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
        init = config.get("init_lora_weights", True)
        return cls(
            model,
            config["r"],
            config["lora_alpha"],
            config["target_modules"],
            config["lora_dropout"],
            peft_model,
            use_rslora=bool(config.get("use_rslora")),
            use_dora=bool(config.get("use_dora")),
            init=init if isinstance(init, str) else "default",
        )

    # -- the live adapter ---------------------------------------------------------------------------------

    def __init__(
        self,
        model: PreTrainedModel,
        rank: int,
        alpha: float,
        target_modules: list[str],
        dropout: float = 0.0,
        peft_model: PeftModel | None = None,
        *,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "default",
    ) -> None:
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.use_rslora, self.use_dora, self.init = use_rslora, use_dora, init
        # B0 A0 of PiSSA / OLoRA (peft's saved names), which every saved folder subtracts (lora/residual.py).
        self.initial_factors: dict[str, torch.Tensor] | None = None
        if peft_model is None:
            # Resolve names ourselves first so a typo gets our error (listing the layers), not peft's.
            targets = sorted(find_target_linears(model, list(target_modules)))
            config = LoraConfig(
                r=rank,
                # peft annotates lora_alpha as int, but takes any number: its scaling is lora_alpha / r.
                lora_alpha=alpha,  # type: ignore[arg-type]
                lora_dropout=dropout,
                target_modules=targets,
                bias="none",
                task_type="CAUSAL_LM",
                use_rslora=use_rslora,
                use_dora=use_dora,
                # peft lists its init names as a Literal; LoraSettings.check admitted this one.
                init_lora_weights=True if init == "default" else init,  # type: ignore[arg-type]
            )
            peft_model = get_peft_model(model, config)
            if is_residual_init(init):
                self.initial_factors = {
                    k: v.detach().clone().cpu() for k, v in get_peft_model_state_dict(peft_model).items()
                }
        self.peft_model = peft_model
        # peft types it nn.Module; for LoRA (not a prompt-learning method) it is the transformers model wrapped.
        self.base_model = cast(PreTrainedModel, peft_model.get_base_model())
        self.target_modules = list(target_modules)

    @property
    def model(self) -> nn.Module:
        return self.peft_model

    @property
    def scaling(self) -> float:
        """s in ΔW = s B A: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def variant(self) -> str | None:
        """The family member in a few letters (rslora, dora, pissa, ...); None for plain LoRA."""
        parts = [*(["rslora"] if self.use_rslora else []), *(["dora"] if self.use_dora else [])]
        parts += [] if self.init == "default" else [self.init]
        return "+".join(parts) or None

    def title(self) -> str:
        extra = f", {self.variant}" if self.variant else ""
        extra += " (+ d_out magnitudes per layer)" if self.use_dora else ""
        return f"lora (rank {self.rank}, scaling {self.scaling:.4g}{extra})"

    def identity_now(self) -> dict[str, Any]:
        # The family member is checked when a checkpoint is loaded (_refuse_other_variant, residual.trained_part),
        # not here: these keys are metrics.json's identity too, whose schema names adapter and rank only.
        return {"adapter": self.name, "rank": self.rank}

    def adapter_layers(self) -> dict[str, PeftLoraLayer]:
        # LoRA on linear layers (the targets find_target_linears picks): each has what PeftLoraLinear lists.
        return {
            n: PeftLoraLayer(n, cast(PeftLoraLinear, m), self.init)
            for n, m in self.base_model.named_modules()
            if isinstance(m, LoraLayer)
        }

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        # peft's names (what its save_pretrained picks from a gathered state_dict), and anything else training.
        return {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}

    def factor_pair_optimizer(
        self, optimizer_cls: type[torch.optim.Optimizer], optimizer_kwargs: dict[str, Any], ratio: float
    ) -> torch.optim.Optimizer:
        # peft's LoRA+: B (and any trained 1-D tensor, DoRA's magnitude) at lr x ratio, A at lr.
        from peft.optimizers import create_loraplus_optimizer

        kwargs = dict(optimizer_kwargs)
        lr = float(kwargs.pop("lr"))
        kwargs["loraplus_weight_decay"] = kwargs.pop("weight_decay", 0.0)
        return create_loraplus_optimizer(self.peft_model, optimizer_cls, lr=lr, loraplus_lr_ratio=ratio, **kwargs)

    def unload(self) -> PreTrainedModel:
        # peft's unload: puts every base layer back and drops its wrappers (the merge happened layer by layer).
        return cast(PreTrainedModel, self.peft_model.unload())

    def save(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        # With state_dict, peft picks the LoRA entries from it instead of from the live (sharded) model.
        self.peft_model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict)
        if self.initial_factors is not None:  # PiSSA / OLoRA: a LoRA on the original weights
            convert_saved_folder(Path(directory), self.initial_factors, self.use_rslora)

    def load_weights(self, directory: Path) -> None:
        state = load_file(str(Path(directory) / ADAPTER_WEIGHTS_NAME))
        self._refuse_other_variant(Path(directory))
        if self.initial_factors is not None:
            state = trained_part(state, self.initial_factors, self.rank, str(directory))
        expected = {k: v.shape for k, v in self.peft_model.state_dict().items() if "lora_" in k}
        problems = []
        for key, tensor in state.items():
            live_key = key.replace(".weight", f".{PEFT_ADAPTER}.weight")
            if live_key in expected and expected[live_key] != tensor.shape:
                problems.append(f"{key}: saved {tuple(tensor.shape)}, model has {tuple(expected[live_key])}")
        if problems:
            raise MoraTrainError(f"LoRA adapter in {directory} does not fit this model: " + "; ".join(problems))
        # peft annotates its result as `namedtuple` (the factory, not a type); it is torch's load_state_dict result.
        result = cast("_IncompatibleKeys", set_peft_model_state_dict(self.peft_model, state))
        if result.unexpected_keys:
            raise MoraTrainError(
                f"LoRA adapter in {directory} names modules this model lacks: {sorted(result.unexpected_keys)[:5]}"
            )

    def _refuse_other_variant(self, directory: Path) -> None:
        """A folder of another family member than this adapter's: DoRA's magnitudes, rsLoRA's scaling, or the
        rank a PiSSA / OLoRA folder is saved at (2 x rank: lora/residual.py) against a plain one's."""
        try:
            saved = json.loads((directory / ADAPTER_CONFIG_NAME).read_text())
        except (OSError, ValueError):
            return  # only the weights were given: their names and shapes are checked next
        theirs = {"r": saved.get("r"), **{k: bool(saved.get(k)) for k in ("use_dora", "use_rslora")}}
        saved_rank = self.rank * (2 if self.initial_factors is not None else 1)
        ours = {"r": saved_rank, "use_dora": self.use_dora, "use_rslora": self.use_rslora}
        if theirs != ours:
            raise MoraTrainError(
                f"LoRA adapter in {directory} was saved with {theirs}, this run's would be {ours} (adapter.init=pissa "
                "or olora saves r = 2 x rank); resume with the rank, adapter.init, adapter.use_dora and "
                "adapter.use_rslora it was trained with, or start over with trainer.resume=false overwrite=true"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "adapter": self.name,
            "rank": self.rank,
            "alpha": self.alpha,
            "scaling": self.scaling,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init": self.init,
            "variant": self.variant,
            "dropout": self.dropout,
            "target_modules": self.target_modules,
        }
