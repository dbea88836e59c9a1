"""What every adapter offers the trainer and the exporter, and how target layers are found."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from mora_train.adapters.config import AdapterSettings, TrainerView
from mora_train.adapters.layer import AdapterLayer
from mora_train.core.errors import MoraTrainError
from mora_train.core.io import write_json_atomically
from mora_train.models.quantization import (
    compute_dtype,
    dequantize_linears,
    forget_quantization,
    is_quantized,
    logical_numel,
    set_submodule,
)

S = TypeVar("S", bound=AdapterSettings)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# adapter_config.json's `format` in folders mora-train writes itself (peft writes LoRA's).
FORMAT = "mora-train"


@dataclass
class ModuleSummary:
    """One adapted layer, as shown in the pre-training summary."""

    name: str
    d_in: int
    d_out: int
    size: str  # "r=8" (LoRA) or "r̂=96" (MoRA) or "full"
    trainable: int


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct last-name components of the model's linear layers (what target_modules can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def match_target_linears(model: nn.Module, targets: list[str]) -> tuple[dict[str, nn.Linear], list[str]]:
    """(linear layers by full name whose name equals, or ends with `.` + an entry of targets; entries matching none).

    `q_proj` matches every `...self_attn.q_proj`; `layers.0.self_attn.q_proj` matches just that one.
    """
    found: dict[str, nn.Linear] = {}
    unmatched = list(targets)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        for target in targets:
            if name == target or name.endswith("." + target):
                found[name] = module
                if target in unmatched:
                    unmatched.remove(target)
    return found, unmatched


def find_target_linears(model: nn.Module, target_modules: list[str]) -> dict[str, nn.Linear]:
    """match_target_linears, raising MoraTrainError (listing what could be named) when an entry matches nothing."""
    found, unmatched = match_target_linears(model, list(target_modules))
    if unmatched:
        raise MoraTrainError(
            f"adapter.target_modules entries {sorted(unmatched)} match no linear layer of this model; "
            f"its linear layers are named {linear_layer_names(model)} — set adapter.target_modules to some of those"
        )
    return found


def singular_values_kept(S: torch.Tensor, rank: int | None = None, energy: float | None = None) -> int:
    """How many of the descending singular values `S` to keep: `rank`; or the fewest holding a fraction
    `energy` of the squared Frobenius norm; or (neither) the numerical rank — values above 1e-6 x the
    largest (float32's rounding floor), which drops nothing but rounding noise. At least one."""
    if rank is not None:
        k = min(int(rank), S.numel())
    elif energy is not None:
        cumulative = torch.cumsum(S**2, 0) / (S**2).sum().clamp_min(torch.finfo(torch.float64).tiny)
        k = int((cumulative < energy - 1e-12).sum().item()) + 1
    else:
        k = int((S[0] * 1e-6 < S).sum().item()) if S.numel() and S[0] > 0 else 1
    return max(1, min(k, S.numel()))


def svd_factors(
    delta: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (U_k S_k, V_k^T) of `delta` (float64 maths, float32 result): ΔW ≈ B @ A.

    k: singular_values_kept(S, rank, energy).
    """
    U, S, Vh = torch.linalg.svd(delta.detach().double().cpu(), full_matrices=False)
    k = singular_values_kept(S, rank, energy)
    B = (U[:, :k] * S[:k]).float().to(delta.device)
    return B.contiguous(), Vh[:k].float().to(delta.device).contiguous()


def copy_saved_weights(
    live: dict[str, nn.Parameter], state: dict[str, torch.Tensor], source: str, what: str, cause: str, unknown: str
) -> None:
    """Copy saved tensors into the live parameters of the same names; every mismatch (missing, extra,
    shape) is named in one MoraTrainError and nothing is copied then. `what` names the weights, `cause`
    the likely reason, `unknown` what a saved name the model lacks means."""
    problems = [f"{k}: missing from {source}" for k in live if k not in state]
    problems += [f"{k}: saved in {source} but {unknown}" for k in state if k not in live]
    problems += [
        f"{k}: saved shape {tuple(state[k].shape)}, this model's is {tuple(live[k].shape)}"
        for k in live
        if k in state and state[k].shape != live[k].shape
    ]
    if problems:
        raise MoraTrainError(
            f"{what} from {source} does not fit this model ({cause}): "
            + "; ".join(problems[:8])
            + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        )
    with torch.no_grad():
        for key, param in live.items():
            param.copy_(state[key].to(dtype=param.dtype, device=param.device))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        count = logical_numel(param)  # a packed 4-bit weight counts the d_out x d_in entries it stands for
        total += count
        trainable += count if param.requires_grad else 0
    return trainable, total


def settings_as(kind: type[S], settings: AdapterSettings) -> S:
    """`settings` as the method's own settings class (a method is only ever given the section of its name)."""
    if not isinstance(settings, kind):
        raise TypeError(f"expected {kind.__name__} for adapter.name={settings.name}, got {type(settings).__name__}")
    return settings


def positive_rank(rank: int | None) -> int:
    """`rank` for a method that uses it; the config check refuses anything else before a model is built."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise MoraTrainError(RANK_PROBLEM.format(rank=rank))
    return rank


RANK_PROBLEM = "`rank={rank}` must be a positive integer (the LoRA rank; MoRA matches its parameter count)"


class Adapter(ABC):
    """What the rest of mora-train may ask of a fine-tuning method (LoRA, MoRA, full fine-tuning).

    Code outside `mora_train.adapters` holds an Adapter and calls these operations; it never asks which
    method it holds (`name` is recorded in metrics and checkpoints, never branched on). A method's
    refusals (config keys, engines, layer shapes) are class methods, so they can be checked before a
    model is loaded. What only some methods can do (restarts, operator switches, LoRA factors) is a
    mix-in of adapters/capabilities.py.

    A method gives its layers (adapter_layers: the layer protocol of adapters/layer.py); merge, ΔW, the run
    summary, save/load in mora-train's format, and the capabilities' restarts and LoRA factors are written once
    here over them. A method overrides only what differs (LoRA saves peft's format and unloads through peft).
    """

    name: ClassVar[str]
    base_model: PreTrainedModel
    # The typed `adapter` section of this method (its own keys beside the shared ones).
    settings_type: ClassVar[type[AdapterSettings]] = AdapterSettings
    # Why a layer split across ranks (tensor/sequence parallelism) cannot run this method.
    parallelism_refusal: ClassVar[str] = "mora-train's export gathers data-parallel shards only"
    # True when the base weights stay frozen beside separate trainable tensors (FSDP1 then needs use_orig_params).
    freezes_base: ClassVar[bool] = True
    # Why this method cannot train on a 4-/8-bit base (model.quantization); None: it can.
    quantized_base_refusal: ClassVar[str | None] = None
    # Set by dequantize_base: the base was loaded quantized and now holds its de-quantized weights.
    base_was_quantized: bool = False

    # -- before a model exists --------------------------------------------------------------------------

    @classmethod
    def config_problems(cls, settings: AdapterSettings, rank: int | None, trainer: TrainerView) -> list[str]:
        """Problems of these settings with `rank` and the trainer's restart settings, one message each naming the
        key and the fix (each section's own problems are found when it is parsed)."""
        if trainer.restart.mora_types is not None:
            return ["`trainer.restart.mora_types` only applies to adapter=mora; remove it"]
        return []

    @classmethod
    def quantized_base_problem(cls, settings: AdapterSettings, quantization: str) -> str | None:
        """Why these settings cannot train on a base quantized as `quantization` (model.quantization: nf4, fp4,
        int8); None: they can. By default the method's own `quantized_base_refusal`; a method whose refusal
        depends on its settings overrides it."""
        return cls.quantized_base_refusal

    @classmethod
    def identity(cls, settings: AdapterSettings, rank: int | None) -> dict[str, Any]:
        """What a checkpoint must match to be resumed by a run with these settings (written into every checkpoint)."""
        return {"adapter": cls.name, "rank": rank}

    @classmethod
    def layer_problems(cls, layers: dict[str, nn.Linear], settings: AdapterSettings, rank: int) -> list[str]:
        """Target layers this method cannot serve at this rank (checked once the model is loaded)."""
        return []

    @classmethod
    @abstractmethod
    def trainable_count(
        cls, model: nn.Module, layers: dict[str, nn.Linear], settings: AdapterSettings, rank: int
    ) -> int:
        """Parameters this method would train on `layers` of `model` (for disk estimates), without building it."""

    @classmethod
    @abstractmethod
    def build(
        cls,
        model: PreTrainedModel,
        settings: AdapterSettings,
        rank: int | None,
        load_base: Callable[[], nn.Module] | None = None,
    ) -> Adapter:
        """Wrap `model` as these settings say (adapters.build_adapter prepares a quantized base first)."""

    # -- a saved folder ------------------------------------------------------------------------------------

    @classmethod
    def reads(cls, config: dict[str, Any]) -> bool:
        """Whether this class reads the folder whose adapter_config.json is `config` (load_adapter asks every
        registered class). By default: a folder mora-train wrote for this method (`format`, `adapter`)."""
        return config.get("format") == FORMAT and config.get("adapter") == cls.name

    @classmethod
    def load(cls, model: PreTrainedModel, folder: Path, config: dict[str, Any]) -> Adapter:
        """Attach the adapter saved in `folder` (whose config reads() accepted) to `model`. By default: build from
        the saved settings (the keys of describe() that name a field of settings_type, and `rank`), then
        load_weights."""
        fields = {f.name for f in dataclasses.fields(cls.settings_type)} - {"name"}
        settings = cls.settings_type(name=cls.name, **{k: config[k] for k in fields if k in config})
        adapter = cls.build(model, settings, config.get("rank"))
        adapter.load_weights(folder)
        return adapter

    # -- the live adapter ---------------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The module the trainer optimises."""
        return self.base_model

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The method and its settings as JSON (adapter_config.json, metrics.json, the run summary)."""

    def title(self) -> str:
        """One line for the run summary, e.g. `mora (rank 8, type rope)`."""
        return self.name

    @abstractmethod
    def identity_now(self) -> dict[str, Any]:
        """identity() of the live adapter: what its checkpoints record and a resume must match."""

    @abstractmethod
    def adapter_layers(self) -> Mapping[str, AdapterLayer]:
        """Module name -> each adapted layer (adapters/layer.py): merge, ΔW, summaries, restarts and the LoRA
        export are written once over these. Empty once merge_and_unload() has run."""

    def module_summaries(self) -> list[ModuleSummary]:
        """One row per adapted layer for the run summary (empty: nothing per layer worth showing)."""
        rows = []
        for name, layer in self.adapter_layers().items():
            linear = layer.frozen_linear()
            trained = sum(p.numel() for p in layer.adapter_params().values())
            d_in, d_out = int(linear.in_features), int(linear.out_features)
            rows.append(ModuleSummary(name, d_in, d_out, layer.size_label(), trained))
        return rows

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter for everything the method trains; save() writes exactly these. By default each
        layer's adapter_params as `<module name>.<parameter name>`."""
        return {f"{n}.{k}": p for n, layer in self.adapter_layers().items() for k, p in layer.adapter_params().items()}

    def save(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trained weights (+ config) into an existing empty folder; load_adapter() reads it back. By
        default mora-train's format: trainable_parameters() as safetensors beside describe() as JSON.

        `state_dict` (trainable-parameter name -> tensor) replaces the live weights, for engines whose live
        weights are shards (ZeRO-3, FSDP): the trainer gathers them first.
        """
        live = self.trainable_parameters()
        source = live if state_dict is None else {k: state_dict[k] for k in live}
        tensors = {k: p.detach().contiguous().cpu() for k, p in source.items()}
        directory = Path(directory)
        save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt", "adapter": self.name})
        write_json_atomically(directory / ADAPTER_CONFIG_NAME, self.describe())

    def load_weights(self, directory: Path) -> None:
        """Load weights saved by save(); errors name the module and shapes that disagree."""
        self.load_state(load_file(str(Path(directory) / ADAPTER_WEIGHTS_NAME)), str(directory))

    def load_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Copy saved tensors (trainable-parameter name -> tensor) into the live parameters; every mismatch is
        named in one MoraTrainError, and nothing is copied then."""
        copy_saved_weights(
            self.trainable_parameters(),
            state,
            source,
            f"{self.name} adapter",
            "wrong base model, rank or target_modules?",
            f"this model has no such {self.name} module",
        )

    @property
    def saves_whole_model(self) -> bool:
        """True when save() writes every weight of the model (then RUN_DIR/adapter would only repeat merged/)."""
        return False

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Module name -> ΔW (float32, d_out x d_in) for every adapted linear layer."""
        with torch.no_grad():
            return {name: layer.delta_weight() for name, layer in self.adapter_layers().items()}

    def merge_and_unload(self) -> PreTrainedModel:
        """Fold ΔW into the base weights and return a plain transformers model (no adapter modules); the
        adapter is spent then. On a quantized base (model.quantization) the base is de-quantized first
        (`dequantize_base`), so ΔW is added to float weights, never re-quantized with them."""
        self.dequantize_base()
        for layer in self.adapter_layers().values():
            try:
                layer.merge()  # W + ΔW in float32, checked finite
            except ValueError as err:
                raise MoraTrainError(str(err)) from None
        return self.unload()

    def unload(self) -> PreTrainedModel:
        """Put each adapted layer's frozen linear layer back in its place and return the transformers model."""
        for name, layer in self.adapter_layers().items():
            set_submodule(self.base_model, name, layer.frozen_linear())
        return self.base_model

    def dequantize_base(self) -> bool:
        """On a quantized base: replace each 4-/8-bit layer under the adapter by a float layer holding the weight
        its forward multiplied by (models.quantization.dequantize_linears, in the compute dtype). The adapter
        then sits on a float base, and merges by adding ΔW to those weights — never re-quantizing W + ΔW,
        which would lose most of a small ΔW. Returns whether the base was quantized (now or by an earlier call)."""
        if is_quantized(self.base_model):
            dequantize_linears(self.model, compute_dtype(self.model))
            forget_quantization(self.base_model)
            self.base_was_quantized = True
        return self.base_was_quantized
