"""Load a language model through transformer-lens 4 (`TransformerBridge`) and read activations at a hook."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from saekit.config import ModelConfig, hook_layer
from saekit.fileutil import HashMemo, file_sha256
from saekit.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present; asking for `cuda` without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA device; use device=cpu or device=auto")
    return torch.device(device)


def looks_local(name: str) -> bool:
    """A name meant as a folder (absolute, relative with ./ or ../, or ~) rather than a Hub id."""
    return name.startswith(("/", "./", "../", "~"))


@dataclass
class LoadedModel:
    """A TransformerBridge plus the facts about it that saekit needs."""

    bridge: object
    name: str
    identity: dict
    d_model: int
    n_layers: int
    d_vocab: int
    bos_token_id: Optional[int]
    device: torch.device
    n_ctx: Optional[int] = None
    """Positions the model can attend over (None: unknown); data.ctx_len must not exceed it."""
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    """Forward passes with hooks attach them to the shared model: two at once (a stream's background fill and an
    evaluation) would swap activations, so every hooked pass holds this lock."""

    @property
    def tokenizer(self):
        return self.bridge.tokenizer

    def check_hook(self, hook: str, setting: str = "hook") -> None:
        """Fail with the valid range when the hook or its layer is not in the model (`setting`: the config key
        that named it, for the message)."""
        layer = hook_layer(hook)
        if layer is not None and layer >= self.n_layers:
            named = f"layer={layer} (hook {hook})" if setting == "hook" else f"{setting}={hook} (layer {layer})"
            raise ConfigError(
                f"{named} is outside {self.name}, which has layers 0..{self.n_layers - 1}; pick a layer in that range"
            )
        if hook not in self.bridge.hook_dict:
            raise ConfigError(
                f"{setting}={hook} is not a hook point of {self.name}; use a transformer-lens name such as "
                f"blocks.0.hook_resid_post (list them with `saekit hooks`)"
            )

    def check_transcoder_hooks(self, hook: str, hook_out: str) -> None:
        """A transcoder's pair: both hooks exist, they are distinct hook points, and `hook` runs first (its output
        is spliced in at `hook_out` from the clean x, so x must be known by then)."""
        self.check_hook(hook)
        self.check_hook(hook_out, "hook_out")
        if self.bridge.hook_dict[hook] is self.bridge.hook_dict[hook_out]:
            raise ConfigError(f"hook_out={hook_out} is another name of hook={hook} (the same hook point); name a "
                              f"different hook, e.g. the MLP's output blocks.L.hook_mlp_out for its input "
                              f"blocks.L.ln2.hook_out")
        order = self.hook_order([hook, hook_out])
        if order.index(hook_out) < order.index(hook):
            raise ConfigError(f"hook_out={hook_out} runs before hook={hook} in {self.name}'s forward pass; a "
                              f"transcoder predicts a later activation from an earlier one: swap the two")

    @torch.no_grad()
    def hook_order(self, hooks: list[str]) -> list[str]:
        """`hooks` in the order the forward pass reaches them (one tiny pass)."""
        reached: list[str] = []

        def recorder(name: str) -> Callable:
            def record(act: torch.Tensor, hook=None) -> torch.Tensor:
                if name not in reached:
                    reached.append(name)
                return act

            return record

        tokens = torch.full((1, 2), self.bos_token_id or 0, dtype=torch.long, device=self.device)
        with self.lock:
            self._run_hooked(tokens, [(name, recorder(name)) for name in hooks], stop_at_layer=None)
        return reached + [name for name in hooks if name not in reached]

    def hook_width(self, hook: str) -> int:
        """Width of the activation at `hook`, read from one tiny forward pass."""
        tokens = torch.full((1, 2), self.bos_token_id or 0, dtype=torch.long, device=self.device)
        acts = self.run_to_hook(tokens, hook)
        return acts.shape[-1]

    @torch.no_grad()
    def run_to_hook(self, tokens: torch.Tensor, hook: str) -> torch.Tensor:
        """Activations at `hook` for a batch of token windows, running only the blocks up to it."""
        return self.run_to_hooks(tokens, [hook])[hook]

    @torch.no_grad()
    def run_to_hooks(self, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
        """Activations at every hook in `hooks` from one forward pass that stops after the deepest of them."""
        captured: dict[str, torch.Tensor] = {}

        def grabber(name: str) -> Callable:
            # Bound by the name asked for: the bridge hands over its canonical HookPoint (an alias may differ).
            def grab(act: torch.Tensor, hook=None) -> torch.Tensor:
                captured[name] = act.detach()
                return act

            return grab

        layers = [hook_layer(name) for name in hooks]
        # A hook outside the blocks (embeddings are before them, ln_final after) needs the whole pass.
        deepest = None if any(layer is None for layer in layers) else max(layers)
        stop = deepest + 1 if deepest is not None and deepest + 1 < self.n_layers else None
        with self.lock:
            self._run_hooked(tokens, [(name, grabber(name)) for name in hooks], stop_at_layer=stop)
        missing = [name for name in hooks if name not in captured]
        if missing:
            raise ConfigError(f"hook={missing[0]} never ran in {self.name}'s forward pass; pick another hook "
                              f"(`saekit hooks` lists them)")
        return {name: captured[name] for name in hooks}

    @torch.no_grad()
    def logits_with_hook(self, tokens: torch.Tensor, hook: str, fn: Optional[Callable]) -> torch.Tensor:
        """Logits of a full forward pass, with `fn(act) -> act` replacing the activation at `hook`."""
        if fn is None:
            with self.lock:
                return self.bridge(tokens)
        return self.logits_with_hooks(tokens, [(hook, fn)])

    @torch.no_grad()
    def logits_with_hooks(self, tokens: torch.Tensor, hooks: list[tuple[str, Callable]]) -> torch.Tensor:
        """Logits of a full forward pass with `fn(act) -> act` at each (hook, fn), applied in forward order (a
        transcoder's splice reads x at one hook and replaces the activation at a later one)."""
        with self.lock:
            return self._run_hooked(tokens, [(name, _act_only(fn)) for name, fn in hooks])

    def _run_hooked(self, tokens: torch.Tensor, fwd_hooks: list, **kwargs) -> torch.Tensor:
        """`run_with_hooks`, with the bridge's refusal of a hook it cannot attach (e.g. `hook_mlp_in` while the
        bridge keeps it switched off) as one line naming the hook."""
        try:
            return self.bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks, **kwargs)
        except ValueError as exc:
            if "cannot add hook" not in str(exc).lower():  # raised by the forward pass itself: not a hook problem
                raise
            names = ", ".join(name for name, _ in fwd_hooks)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"hook {names}: {self.name} cannot hook it ({first[:160]}); pick another hook "
                              f"(`saekit hooks` lists them)") from exc


def _act_only(fn: Callable) -> Callable:
    """A transformer-lens hook (act, hook=…) from a function of the activation alone."""
    return lambda act, hook=None: fn(act)


def _local_identity(folder: Path, memo: Optional[HashMemo]) -> dict:
    """Content hash of a local model folder's config and weight files (part of the cache key)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".json", ".safetensors", ".bin", ".model") and path.is_file():
            digest.update(path.name.encode())
            digest.update(file_sha256(path, memo).encode())
    return {"source": "local", "path": str(folder.resolve()), "sha256": digest.hexdigest()}




# Config keys under which HuggingFace architectures record how many positions they handle.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def context_limit(cfg: ModelConfig) -> Optional[int]:
    """Positions a local model folder handles, read from its config.json without loading it; None for a hub name
    or a config that does not say (the loaded model's n_ctx is checked then)."""
    config = Path(cfg.name).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        facts = json.loads(config.read_text())
    except (OSError, ValueError):  # loading the model reports a broken config in its own words
        return None
    facts = {**facts.get("text_config", {}), **facts} if isinstance(facts.get("text_config"), dict) else facts
    return next((int(facts[key]) for key in _CONTEXT_KEYS if isinstance(facts.get(key), int) and facts[key] > 0), None)


def check_context_length(model_name: str, ctx_len: int, limit: Optional[int]) -> None:
    """A window longer than the model's positions would run it outside what it was trained on (or fail deep
    inside it): refuse before anything is built."""
    if limit is not None and ctx_len > limit:
        raise ConfigError(f"data.ctx_len={ctx_len} is longer than {model_name} handles ({limit} positions); "
                          f"set data.ctx_len={limit} or less")


def _require_hub(cfg: ModelConfig) -> None:
    """A hub name that is not in the local cache needs the Hub: ask it once, without retries, so an offline machine
    fails in a moment instead of after transformers' retries (and with one line)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(cfg.name, "config.json", revision=cfg.revision), str):
        return  # cached: transformers loads it (offline too, with HF_HUB_OFFLINE=1)
    fix = "use a local model folder (model.name=/path/to/model) or a machine with network access to the Hub"
    if constants.HF_HUB_OFFLINE:
        raise DataError(f"model.name={cfg.name} is not in the local HuggingFace cache and HF_HUB_OFFLINE is set; {fix}")
    try:
        HfApi().model_info(cfg.name, revision=cfg.revision, timeout=10)
    except Exception as exc:  # connection errors, unknown repositories, gated models: each a reason not to boot
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DataError(f"model.name={cfg.name}: the Hub cannot provide it ({first}); {fix}, or check the name") from exc


def model_identity(cfg: ModelConfig, memo: Optional[HashMemo] = None) -> dict:
    """What makes two models the same for caching: local content hash, or hub name plus revision.

    With a `memo`, weight files whose stat signature is unchanged are not hashed again.
    """
    folder = Path(cfg.name).expanduser()
    if folder.is_dir():
        return _local_identity(folder, memo)
    if looks_local(cfg.name) or folder.exists():
        raise ConfigError(f"model.name={cfg.name}: no model folder there; point it at a HuggingFace model folder or a hub name")
    return {"source": "hub", "name": cfg.name, "revision": cfg.revision or "main"}


_PROCESS_HASHES = HashMemo()
"""Hashes of model files seen by this process (in memory only): a LoadedModel's identity costs one hash per file."""


def load_model(cfg: ModelConfig, device: torch.device) -> LoadedModel:
    """Boot a TransformerBridge from a local folder or a hub name, with one-line errors when it fails."""
    folder = Path(cfg.name).expanduser()
    local = folder.is_dir()
    if not local:
        model_identity(cfg)  # the one-line error for a path that is not a model folder
        _require_hub(cfg)
    target = str(folder.resolve()) if local else cfg.name
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    transformers.utils.logging.disable_progress_bar()  # saekit shows its own progress

    try:
        bridge = TransformerBridge.boot_transformers(
            target, device=str(device), dtype=_DTYPES[cfg.dtype], revision=cfg.revision
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"model.name={cfg.name}: could not load it ({first}); use a local model folder or check the hub name and network"
        ) from exc
    bridge.eval()
    model_cfg = bridge.cfg
    tokenizer = bridge.tokenizer
    return LoadedModel(
        bridge=bridge,
        name=cfg.short_name,
        identity=model_identity(cfg, _PROCESS_HASHES),
        d_model=int(model_cfg.d_model),
        n_layers=int(model_cfg.n_layers),
        d_vocab=int(model_cfg.d_vocab),
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        device=device,
        n_ctx=int(model_cfg.n_ctx) if getattr(model_cfg, "n_ctx", None) else context_limit(cfg),
    )


def identity_json(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True)
